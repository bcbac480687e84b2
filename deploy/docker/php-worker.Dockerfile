# syntax=docker/dockerfile:1
# A PHP 8.2 CLI image with the message_router extension, for the in-process worker
# (`bin/console message-router:consume`, deploy/kubernetes/php-worker.yaml).
# NOT BUILT HERE: these machines reach no container registry, so this file has never
# been built; tests/deploy.rs only checks its structure. Kept minimal on purpose.
#
#   docker build -f deploy/docker/php-worker.Dockerfile -t message-router-php:0.1.0 .
#
# Debian's PHP 8.2, as in the tests (scripts/setup): the extension is built against the
# same php8.2-dev it is loaded by. Your app goes on top:
#   FROM message-router-php:0.1.0
#   COPY --chown=app:app . /srv/app      (with vendor/ and the warmed cache)

FROM rust:1.95-bookworm AS build
# ext-php-rs needs php-config and PHP's headers (php8.2-dev) and libclang for bindgen;
# librdkafka needs cmake and the zlib, libcurl and OpenSSL headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends php8.2-dev clang libclang-dev \
      cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p router-php \
 && strip target/release/librouter_php.so \
 && cp target/release/librouter_php.so "$(php-config --extension-dir)/message_router.so"

FROM debian:bookworm-slim
# The PHP extensions a Symfony app usually needs besides the CLI; add your app's own.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates php8.2-cli php8.2-xml php8.2-mbstring php8.2-intl \
      libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --home-dir /srv/app --shell /usr/sbin/nologin app \
 && mkdir -p /srv/app && chown app:app /srv/app
COPY --from=build /usr/lib/php/20220829/message_router.so /usr/lib/php/20220829/message_router.so
RUN echo "extension=message_router.so" > /etc/php/8.2/mods-available/message_router.ini \
 && phpenmod -s cli message_router \
 && php -r 'exit(extension_loaded("message_router") ? 0 : 1);'
USER 10001:10001
WORKDIR /srv/app
CMD ["php", "bin/console", "message-router:consume", "--time-limit=3600", "--memory-limit=192M"]
