//! The gRPC handler of the tests: tests/handlers/grpc_handler.py, a Python grpcio
//! server (in the venv scripts/setup makes) of proto/message_router/v1/handler.proto.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, netfault, root, setup_cache, wait_for, Proc};

pub struct GrpcHandler {
    pub proc: Proc,
    pub port: u16,
    pub log: PathBuf,
}

/// The venv's Python (`GRPC_PYTHON` overrides).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("GRPC_PYTHON") {
        return p.into();
    }
    setup_cache().join("venv/bin/python")
}

impl GrpcHandler {
    pub async fn start(log: &Path) -> Self {
        let port = free_port();
        let child = Command::new(python())
            .arg(root().join("tests/handlers/grpc_handler.py"))
            .arg(port.to_string())
            .env("HANDLER_LOG", log)
            .env(netfault::OWNER_ENV, netfault::owner_tag())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the gRPC handler starts (scripts/setup makes its Python venv with grpcio)");
        let handler = GrpcHandler { proc: Proc { child, name: format!("grpc:{port}") }, port, log: log.to_path_buf() };
        let addr = format!("127.0.0.1:{port}");
        wait_for("the gRPC handler to listen", Duration::from_secs(30), || async {
            std::net::TcpStream::connect(&addr).is_ok()
        })
        .await;
        handler
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
