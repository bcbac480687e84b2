# syntax=docker/dockerfile:1
# The message-router daemon. NOT BUILT HERE: these machines reach no container registry,
# so this file has never been built; tests/deploy.rs only checks its structure (stages,
# non-root user, the paths it copies). Kept minimal on purpose.
#
#   docker build -f deploy/docker/daemon.Dockerfile -t message-router:0.1.0 .
#
# (from the repository root; daemon.Dockerfile.dockerignore keeps target/ and .git out
# of the context). Runs as `router` (uid 10001), entrypoint `message-router`:
#   docker run message-router:0.1.0 run --config /etc/message-router/router.yaml

# Rust at least the workspace's rust-version (Cargo.toml); the toolchain the tests use.
FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys: cmake and the headers of zlib, libcurl
# and OpenSSL (as in scripts/setup). No protoc: the gRPC proto is compiled by protox.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p router-daemon \
 && strip target/release/message-router \
 && cp target/release/message-router /usr/local/bin/message-router

FROM debian:bookworm-slim
# ca-certificates for amqps://, rediss://, Kafka SSL and https:// handlers; the shared
# libraries the binary links (OpenSSL, libcurl, zlib).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 router \
 && useradd --uid 10001 --gid router --no-create-home --shell /usr/sbin/nologin router \
 && mkdir -p /etc/message-router
COPY --from=build /usr/local/bin/message-router /usr/local/bin/message-router
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["message-router"]
CMD ["run", "--config", "/etc/message-router/router.yaml"]
