//! The status page: one HTML file (styles and script inline) compiled into the
//! binary, so it works offline and needs no build step. It holds no data: the
//! script reads the admin API once a second (with the token the operator types, kept
//! in the tab's session storage, when the router has one).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("status.html");

pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing but this page's own inline code and its own origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
}
