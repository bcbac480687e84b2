//! `handlers.<name>` with `type: grpc`: the gRPC target's own keys.

use router_core::config::{ConfigIssue, HandlerConfig};
use serde::Deserialize;

use crate::http::config::SigningConfig;
use crate::pool::{check_endpoints, Balance};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Servers of `message_router.v1.Handler`: `http://host:port` (HTTP/2 without TLS).
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    /// Signatures of the HTTP contract, carried in the request's headers map
    /// (`x-router-signature`), the same as for `type: http`.
    pub signing: Option<SigningConfig>,
}

impl GrpcConfig {
    /// The gRPC section of handler `name`, checked: every problem with its key path.
    pub fn read(name: &str, handler: &HandlerConfig) -> Result<GrpcConfig, Vec<ConfigIssue>> {
        let config: GrpcConfig = handler.settings(name).map_err(|issue| vec![issue])?;
        let p = format!("handlers.{name}");
        let mut issues = check_endpoints(
            &p,
            &config.endpoints,
            "list at least one gRPC server URL",
            "http://host:port",
            |endpoint| match url::Url::parse(endpoint) {
                Ok(u) if u.scheme() == "http" && u.host().is_some() && u.port().is_some() => Ok(()),
                Ok(u) if u.scheme() == "https" => Err("TLS to gRPC handlers is not supported yet".to_string()),
                Ok(u) => Err(format!("scheme is {:?}, or no port", u.scheme())),
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

    #[test]
    fn endpoints_are_http_with_a_port() {
        let read = |yaml: &str| {
            let handler: HandlerConfig = serde_yaml_ng::from_str(yaml).expect("yaml");
            GrpcConfig::read("h", &handler)
                .map(|_| ())
                .map_err(|i| i.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
        };
        assert!(read(r#"{ type: grpc, endpoints: ["http://127.0.0.1:50051"] }"#).is_ok());
        let err = read(r#"{ type: grpc, endpoints: ["127.0.0.1:50051", "https://h:1"] }"#).expect_err("bad");
        assert!(err.contains("handlers.h.endpoints[0]: \"127.0.0.1:50051\" must be http://host:port"), "{err}");
        assert!(err.contains("handlers.h.endpoints[1]") && err.contains("TLS"), "{err}");
        let err = read(r#"{ type: grpc, endpoints: ["http://h:1"], signing: { secret: short } }"#).expect_err("bad");
        assert!(err.contains("handlers.h.signing.secret: must be at least 16 characters"), "{err}");
    }
}
