//! Which delivery target reaches each handler (`handlers.<name>.type`). The one place
//! that lists the targets: a new one is a folder beside `http/` (its config, checked,
//! and its `Target`) and an arm in [`check`] and in `one`. router-core does not
//! change: it keeps a handler's target section for the target to read.

use std::collections::HashMap;
use std::sync::Arc;

use router_core::config::{Config, ConfigIssue, HandlerConfig};
use router_core::{Metrics, Target};

use crate::fastcgi::{config::FastcgiConfig, FastcgiTarget};
use crate::grpc::{config::GrpcConfig, GrpcTarget};
use crate::http::{config::HttpConfig, HttpTarget};

/// The targets the daemon can deliver through, as `type` names them.
const KINDS: &[&str] = &["http", "fastcgi", "grpc"];

/// Every problem of every handler's target section, with key paths.
pub fn check(config: &Config) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    for (name, handler) in &config.handlers {
        let problems = match handler.kind.as_str() {
            "http" => HttpConfig::read(name, handler).err(),
            "fastcgi" => FastcgiConfig::read(name, handler).err(),
            "grpc" => GrpcConfig::read(name, handler).err(),
            other => Some(vec![unknown(name, other)]),
        };
        issues.extend(problems.unwrap_or_default());
    }
    issues
}

fn unknown(name: &str, kind: &str) -> ConfigIssue {
    ConfigIssue::new(format!("handlers.{name}.type"), format!("unknown target {kind:?} (one of: {})", KINDS.join(", ")))
}

/// What targets of one kind share (one HTTP client and its gauge for every handler).
#[derive(Default)]
struct Shared {
    up: Option<prometheus::IntGaugeVec>,
    http: Option<reqwest::Client>,
}

impl Shared {
    /// `router_endpoint_up{handler,endpoint}`, for every target with endpoints.
    fn up(&mut self, metrics: &Metrics) -> anyhow::Result<prometheus::IntGaugeVec> {
        if let Some(up) = &self.up {
            return Ok(up.clone());
        }
        let up = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("router_endpoint_up", "1 while a handler endpoint accepts connections"),
            &["handler", "endpoint"],
        )?;
        metrics.register(Box::new(up.clone()))?;
        self.up = Some(up.clone());
        Ok(up)
    }

    fn http(&mut self) -> anyhow::Result<reqwest::Client> {
        if let Some(h) = &self.http {
            return Ok(h.clone());
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("message-router/", env!("CARGO_PKG_VERSION")))
            .build()?;
        self.http = Some(client.clone());
        Ok(client)
    }
}

/// The target of every handler of a config that [`check`] accepted.
pub fn build(config: &Config, metrics: &Metrics) -> anyhow::Result<HashMap<String, Arc<dyn Target>>> {
    Builder::default().build(config, config.handlers.keys(), metrics)
}

/// Builds targets and keeps what they share (one HTTP client, the endpoint gauge)
/// from start-up through every reload.
#[derive(Default)]
pub struct Builder(parking_lot::Mutex<Shared>);

impl Builder {
    /// The targets of the handlers `names` of `config`.
    pub fn build<'a>(
        &self,
        config: &Config,
        names: impl IntoIterator<Item = &'a String>,
        metrics: &Metrics,
    ) -> anyhow::Result<HashMap<String, Arc<dyn Target>>> {
        let mut shared = self.0.lock();
        let mut targets = HashMap::new();
        for name in names {
            if let Some(handler) = config.handlers.get(name) {
                targets.insert(name.clone(), one(name, handler, metrics, &mut shared)?);
            }
        }
        Ok(targets)
    }

    /// Drop the endpoint gauges of a handler a reload removes or rebuilds, so
    /// `/metrics` and `/api/handlers` show only the endpoints configured now. Returns
    /// them for [`Builder::restore`].
    pub fn forget(&self, handler: &str) -> Vec<(String, i64)> {
        let Some(up) = self.0.lock().up.clone() else { return Vec::new() };
        router_core::metrics::forget(&up, "handler", handler)
            .into_iter()
            .map(|(mut labels, value)| (labels.remove("endpoint").unwrap_or_default(), value))
            .collect()
    }

    /// Put back what [`Builder::forget`] took (the reload was refused).
    pub fn restore(&self, handler: &str, endpoints: Vec<(String, i64)>) {
        let Some(up) = self.0.lock().up.clone() else { return };
        for (endpoint, value) in endpoints {
            up.with_label_values(&[handler, endpoint.as_str()]).set(value);
        }
    }
}

fn one(name: &str, handler: &HandlerConfig, metrics: &Metrics, shared: &mut Shared) -> anyhow::Result<Arc<dyn Target>> {
    let invalid = |issues: Vec<ConfigIssue>| {
        anyhow::anyhow!(issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    };
    match handler.kind.as_str() {
        "http" => {
            let config = HttpConfig::read(name, handler).map_err(invalid)?;
            let (client, up) = (shared.http()?, shared.up(metrics)?);
            Ok(Arc::new(HttpTarget::new(name, &config, handler.timeout, client, &up).map_err(anyhow::Error::msg)?))
        }
        "fastcgi" => {
            let config = FastcgiConfig::read(name, handler).map_err(invalid)?;
            let up = shared.up(metrics)?;
            Ok(Arc::new(
                FastcgiTarget::new(name, &config, handler.timeout, handler.max_in_flight.most(), &up)
                    .map_err(anyhow::Error::msg)?,
            ))
        }
        "grpc" => {
            let config = GrpcConfig::read(name, handler).map_err(invalid)?;
            let up = shared.up(metrics)?;
            Ok(Arc::new(GrpcTarget::new(name, &config, handler.timeout, &up).map_err(anyhow::Error::msg)?))
        }
        other => Err(invalid(vec![unknown(name, other)])),
    }
}

#[cfg(test)]
mod tests {
    use router_core::config::parse_with;

    const CONFIG: &str = r#"
transports:
  rabbit: { type: amqp, url: "amqp://guest:guest@127.0.0.1:5672/%2f" }
handlers:
  orders: { endpoints: ["http://127.0.0.1:8080/"] }
subscriptions:
  orders: { transport: rabbit, queue: orders, prefetch: 8 }
routes:
  - { name: all, handler: orders }
"#;

    fn errors(text: &str) -> String {
        match parse_with(text, "router.yaml", &|_| None, &crate::daemon_issues) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn http_is_the_default_and_other_types_are_named() {
        assert_eq!(errors(CONFIG), "");
        assert_eq!(errors(&CONFIG.replace("{ endpoints", "{ type: http, endpoints")), "");
        let got = errors(&CONFIG.replace("{ endpoints", "{ type: smtp, endpoints"));
        assert!(
            got.contains("router.yaml: handlers.orders.type: unknown target \"smtp\" (one of: http, fastcgi, grpc"),
            "{got}"
        );
    }

    #[test]
    fn core_and_target_problems_come_in_one_list() {
        let got = errors(&CONFIG.replace("prefetch: 8", "prefetch: 0").replace("http://127.0.0.1:8080/", "ftp://x/"));
        assert!(got.contains("router.yaml: subscriptions.orders.prefetch: must be at least 1"), "{got}");
        assert!(got.contains("router.yaml: handlers.orders.endpoints[0]: \"ftp://x/\" must be an http://"), "{got}");
    }
}
