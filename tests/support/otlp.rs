//! Real OTLP receivers for the tracing tests: over HTTP (`POST /v1/traces`, served
//! here) and over gRPC (`TraceService/Export`, a Python grpcio server in another
//! process: `tests/handlers/otlp_grpc_receiver.py`). Either way the
//! `ExportTraceServiceRequest` the router's exporter sent is decoded with the official
//! proto types and kept as flat [`Span`]s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;

/// One received span, ids in lowercase hex as in a `traceparent`.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client, 5 consumer.
    pub kind: i32,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub attributes: BTreeMap<String, String>,
    pub links: Vec<(String, String)>,
}

impl Span {
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map(String::as_str).unwrap_or_default()
    }
}

pub const KIND_CLIENT: i32 = 3;
pub const KIND_CONSUMER: i32 = 5;
pub const STATUS_ERROR: i32 = 2;

pub struct Receiver {
    /// The base URL to configure as `tracing.endpoint`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
    /// The gRPC receiver's process (killed at drop).
    _grpc: Option<crate::Proc>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(spans.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { endpoint: format!("http://{addr}"), spans, task, _grpc: None }
    }

    /// An OTLP/gRPC receiver (configure `protocol: grpc`): the Python grpcio server of
    /// the venv scripts/setup makes, writing each request to `log`, read back here.
    pub async fn start_grpc(log: &std::path::Path) -> Self {
        use std::io::BufRead;
        let port = crate::free_port();
        std::fs::write(log, "").expect("receiver log");
        let child = std::process::Command::new(crate::grpc::python())
            .arg(crate::root().join("tests/handlers/otlp_grpc_receiver.py"))
            .arg(port.to_string())
            .arg(log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the OTLP/gRPC receiver starts (scripts/setup makes its Python venv with grpcio)");
        let proc = crate::Proc { child, name: format!("otlp-grpc:{port}") };
        crate::wait_for("the OTLP/gRPC receiver to listen", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (into, log) = (spans.clone(), log.to_path_buf());
        let task = tokio::spawn(async move {
            let mut read = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(f) = std::fs::File::open(&log) else { continue };
                let lines: Vec<String> = std::io::BufReader::new(f).lines().map_while(Result::ok).collect();
                // A line is whole once the next one started or the file ends in a newline.
                let complete = std::fs::read(&log).map(|b| b.ends_with(b"\n")).unwrap_or(false);
                let upto = if complete { lines.len() } else { lines.len().saturating_sub(1) };
                for line in lines.iter().take(upto).skip(read) {
                    let bytes = (0..line.len() / 2)
                        .filter_map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).ok())
                        .collect::<Vec<u8>>();
                    let request =
                        ExportTraceServiceRequest::decode(bytes.as_slice()).expect("an ExportTraceServiceRequest");
                    into.lock().expect("spans").extend(flatten(request));
                }
                read = read.max(upto);
            }
        });
        Receiver { endpoint: format!("http://127.0.0.1:{port}"), spans, task, _grpc: Some(proc) }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }

    /// The spans of one trace (trace id in hex).
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }

    /// Wait until `cond` holds for the spans received, or panic with what came.
    pub async fn wait(&self, what: &str, timeout: Duration, cond: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: not within {timeout:?}; received:\n{spans:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Span>>>>,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let proto = [(header::CONTENT_TYPE, "application/x-protobuf")];
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, proto, Vec::new());
    };
    spans.lock().expect("spans").extend(flatten(request));
    // An empty ExportTraceServiceResponse: everything accepted.
    (StatusCode::OK, proto, Vec::new())
}

/// Every span of a request, with its resource's `service.name`.
fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service =
            rs.resource.as_ref().and_then(|r| attributes(&r.attributes).remove("service.name")).unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    status: s.status.map(|st| st.code).unwrap_or(0),
                    attributes: attributes(&s.attributes),
                    links: s.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
