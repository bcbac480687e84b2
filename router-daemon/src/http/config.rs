//! `handlers.<name>` with `type: http` (the default): the HTTP target's own keys. The
//! engine's keys of every handler (`timeout`, `max_in_flight`, `circuit_breaker`)
//! are router-core's.

use router_core::config::{ConfigIssue, HandlerConfig};
use serde::Deserialize;

use crate::pool::{check_endpoints, Balance};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Base URLs of the handler's instances. Each delivery is a POST.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    /// Sign requests with HMAC-SHA256 so endpoints can refuse other callers.
    pub signing: Option<SigningConfig>,
}

/// `handlers.<name>.signing`. Debug output names no secret (a config may be logged).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// The key every request is signed with (>= 16 characters).
    pub secret: String,
    /// During a rotation: the key being retired. Requests then carry both signatures
    /// (`x-router-signature: v1=<with secret>, v1=<with previous_secret>`), so an
    /// endpoint that knows either key accepts them.
    #[serde(default)]
    pub previous_secret: Option<String>,
}

impl SigningConfig {
    /// Its problems, at `path` (`handlers.<name>.signing`), for every target that signs.
    pub fn check(&self, path: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.secret.len() < 16 {
            issues.push(ConfigIssue::new(format!("{path}.secret"), "must be at least 16 characters"));
        }
        if let Some(previous) = &self.previous_secret {
            if previous.len() < 16 {
                issues.push(ConfigIssue::new(format!("{path}.previous_secret"), "must be at least 16 characters"));
            }
            if *previous == self.secret {
                issues.push(ConfigIssue::new(
                    format!("{path}.previous_secret"),
                    "must differ from signing.secret (omit it when no rotation is in progress)",
                ));
            }
        }
        issues
    }

    /// The keys to sign with, the current one first.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        std::iter::once(&self.secret).chain(self.previous_secret.as_ref()).map(|s| s.clone().into_bytes()).collect()
    }
}

impl std::fmt::Debug for SigningConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningConfig")
            .field("secret", &"<redacted>")
            .field("previous_secret", &self.previous_secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpConfig {
    /// The HTTP section of handler `name`, checked: every problem with its key path.
    pub fn read(name: &str, handler: &HandlerConfig) -> Result<HttpConfig, Vec<ConfigIssue>> {
        let config: HttpConfig = handler.settings(name).map_err(|issue| vec![issue])?;
        let p = format!("handlers.{name}");
        let mut issues = check_endpoints(
            &p,
            &config.endpoints,
            "list at least one endpoint URL",
            "an http:// or https:// URL with a host, like http://127.0.0.1:8080/",
            |endpoint| match url::Url::parse(endpoint) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
                Ok(u) => Err(format!("scheme is {:?}", u.scheme())),
                Err(e) => Err(e.to_string()),
            },
        );
        if let Some(s) = &config.signing {
            issues.extend(s.check(&format!("{p}.signing")));
        }
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(yaml: &str) -> HandlerConfig {
        serde_yaml_ng::from_str(yaml).expect("a handler section")
    }

    fn problems(yaml: &str) -> String {
        match HttpConfig::read("orders", &handler(yaml)) {
            Ok(_) => String::new(),
            Err(issues) => issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        }
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        let got = problems(r#"{ endpoints: ["ftp://x/", "http://php:8080/"] }"#);
        assert!(got.contains("handlers.orders.endpoints[0]: \"ftp://x/\" must be an http:// or https:// URL"), "{got}");
        assert!(!got.contains("endpoints[1]"), "{got}");
        assert!(problems("{ endpoints: [] }").contains("handlers.orders.endpoints: list at least one"));
        assert!(problems("{ timeout: 5s }").contains("handlers.orders: missing field `endpoints`"));
        assert!(
            problems(r#"{ endpoints: ["http://a/"], balanse: x }"#).contains("handlers.orders.balanse: unknown field")
        );
    }

    #[test]
    fn signing_takes_a_previous_secret_during_a_rotation() {
        let signed = |signing: &str| format!(r#"{{ endpoints: ["http://php:8080/"], signing: {signing} }}"#);
        let c = HttpConfig::read(
            "orders",
            &handler(&signed(r#"{ secret: "new-secret-0123456789", previous_secret: "old-secret-0123456789" }"#)),
        )
        .expect("valid");
        let s = c.signing.expect("signing");
        assert_eq!(s.keys(), [b"new-secret-0123456789".to_vec(), b"old-secret-0123456789".to_vec()]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("secret-0123456789"), "Debug shows no secret: {shown}");
        let one =
            HttpConfig::read("orders", &handler(&signed(r#"{ secret: "new-secret-0123456789" }"#))).expect("valid");
        assert_eq!(one.signing.expect("signing").keys().len(), 1);

        let got = problems(&signed(r#"{ secret: "new-secret-0123456789", previous_secret: "short" }"#));
        assert!(got.contains("handlers.orders.signing.previous_secret: must be at least 16 characters"), "{got}");
        let got =
            problems(&signed(r#"{ secret: "same-secret-0123456789", previous_secret: "same-secret-0123456789" }"#));
        assert!(got.contains("handlers.orders.signing.previous_secret: must differ from signing.secret"), "{got}");
        assert!(!got.contains("same-secret"), "errors name no secret: {got}");
    }
}
