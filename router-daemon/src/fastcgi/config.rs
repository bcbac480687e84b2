//! `handlers.<name>` with `type: fastcgi`: the FastCGI target's own keys.

use std::collections::BTreeMap;

use router_core::config::{ConfigIssue, HandlerConfig};
use serde::Deserialize;

use crate::http::config::SigningConfig;
use crate::pool::{check_endpoints, Balance};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastcgiConfig {
    /// PHP-FPM pools: `tcp://host:port` or `unix:///path/to/php-fpm.sock`.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    /// The PHP script every message is handed to, as a path on the FPM host
    /// (`/srv/app/public/index.php`, or the bridge's `front.php`).
    pub script_filename: String,
    /// `REQUEST_URI`: the path the app routes on (a Symfony app: the delivery
    /// controller's route, like `/message-router`).
    #[serde(default = "default_request_uri")]
    pub request_uri: String,
    /// `SCRIPT_NAME`; default `/` and the script's file name.
    #[serde(default)]
    pub script_name: Option<String>,
    /// More CGI variables for every request (`APP_ENV: prod`, `HTTPS: "on"` ...).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Signatures of the HTTP contract, the same as for `type: http`.
    pub signing: Option<SigningConfig>,
    /// Connections kept open to each endpoint, each serving one request at a time.
    /// A kept connection holds one PHP-FPM worker, so this must not exceed the pool's
    /// `pm.max_children` (less what other clients of the pool need): a connection
    /// beyond it waits in FPM's backlog and times out. Default: `max_in_flight` (with
    /// `auto`, its `max`: the most the limit can reach).
    #[serde(default)]
    pub max_connections: Option<usize>,
}

fn default_request_uri() -> String {
    "/".into()
}

/// Where one FPM pool listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Address {
    /// `tcp://host:port` or `unix:///path` (also `unix:/path`).
    pub fn parse(endpoint: &str) -> Result<Address, String> {
        let url = url::Url::parse(endpoint).map_err(|e| e.to_string())?;
        match url.scheme() {
            "tcp" => match (url.host_str(), url.port()) {
                (Some(host), Some(port)) if url.path().is_empty() || url.path() == "/" => {
                    Ok(Address::Tcp(format!("{host}:{port}")))
                }
                (Some(_), Some(_)) => Err("a tcp:// endpoint has no path".into()),
                _ => Err("a tcp:// endpoint needs a host and a port".into()),
            },
            "unix" if url.host_str().is_none_or(str::is_empty) && url.path().len() > 1 => {
                Ok(Address::Unix(url.path().into()))
            }
            "unix" => Err("a unix endpoint is unix:///absolute/path/to/php-fpm.sock".into()),
            other => Err(format!("scheme is {other:?}")),
        }
    }
}

impl FastcgiConfig {
    /// The FastCGI section of handler `name`, checked: every problem with its key path.
    pub fn read(name: &str, handler: &HandlerConfig) -> Result<FastcgiConfig, Vec<ConfigIssue>> {
        let config: FastcgiConfig = handler.settings(name).map_err(|issue| vec![issue])?;
        let p = format!("handlers.{name}");
        let mut issues = check_endpoints(
            &p,
            &config.endpoints,
            "list at least one PHP-FPM address",
            "tcp://host:port or unix:///path/to/php-fpm.sock",
            |endpoint| Address::parse(endpoint).map(|_| ()),
        );
        if let Some(s) = &config.signing {
            issues.extend(s.check(&format!("{p}.signing")));
        }
        if !config.script_filename.starts_with('/') {
            issues.push(ConfigIssue::new(
                format!("{p}.script_filename"),
                format!("{:?} must be an absolute path on the PHP-FPM host", config.script_filename),
            ));
        }
        if config.max_connections == Some(0) {
            issues.push(ConfigIssue::new(format!("{p}.max_connections"), "must be at least 1"));
        }
        if !config.request_uri.starts_with('/') {
            issues.push(ConfigIssue::new(format!("{p}.request_uri"), "must start with /"));
        }
        for name in config.params.keys() {
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b == b'=') {
                issues.push(ConfigIssue::new(format!("{p}.params.{name}"), "not a CGI variable name"));
            }
        }
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues)
        }
    }

    /// `SCRIPT_NAME`: as configured, else `/` and the script's file name.
    pub fn script_name(&self) -> String {
        self.script_name.clone().unwrap_or_else(|| {
            let file = self.script_filename.rsplit('/').next().unwrap_or_default();
            format!("/{file}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> String {
        let handler: HandlerConfig = serde_yaml_ng::from_str(yaml).expect("a handler section");
        match FastcgiConfig::read("orders", &handler) {
            Ok(_) => String::new(),
            Err(issues) => issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(Address::parse("tcp://127.0.0.1:9000"), Ok(Address::Tcp("127.0.0.1:9000".into())));
        assert_eq!(Address::parse("tcp://[::1]:9000/"), Ok(Address::Tcp("[::1]:9000".into())));
        assert_eq!(Address::parse("unix:///run/php/fpm.sock"), Ok(Address::Unix("/run/php/fpm.sock".into())));
        assert_eq!(Address::parse("unix:/run/php/fpm.sock"), Ok(Address::Unix("/run/php/fpm.sock".into())));
        for bad in ["tcp://h", "tcp://h:9000/x", "unix://host/sock", "unix:///", "http://h:1/", "h:9000", ""] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_name_the_key() {
        let good = r#"{ type: fastcgi, endpoints: ["tcp://127.0.0.1:9000"], script_filename: /srv/front.php }"#;
        assert_eq!(problems(good), "");
        let got =
            problems(&good.replace("tcp://127.0.0.1:9000", "127.0.0.1:9000").replace("/srv/front.php", "front.php"));
        assert!(got.contains("handlers.orders.endpoints[0]: \"127.0.0.1:9000\" must be tcp://host:port"), "{got}");
        assert!(got.contains("handlers.orders.script_filename: \"front.php\" must be an absolute path"), "{got}");
        assert!(
            problems(r#"{ endpoints: ["tcp://h:1"] }"#).contains("handlers.orders: missing field `script_filename`")
        );
        assert!(problems(&good.replace("}", ", request_uri: x }"))
            .contains("handlers.orders.request_uri: must start with /"));
    }

    #[test]
    fn script_name_defaults_to_the_file_name() {
        let handler: HandlerConfig =
            serde_yaml_ng::from_str(r#"{ endpoints: ["tcp://h:1"], script_filename: /srv/app/public/index.php }"#)
                .expect("yaml");
        let c = FastcgiConfig::read("h", &handler).expect("valid");
        assert_eq!(c.script_name(), "/index.php");
        assert_eq!(c.request_uri, "/");
    }
}
