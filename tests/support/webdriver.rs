//! A real browser for the status page test: Debian's chromium, headless, driven by
//! its chromedriver over the W3C WebDriver protocol. The handful of commands a test
//! needs (open a page, find, click, run a script, screenshot) are plain JSON calls, so
//! no WebDriver client crate.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{free_port, wait_for, Proc};

/// The key W3C WebDriver uses for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    _driver: Proc,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Start chromedriver and a headless chromium session; `None` (the test says why
    /// and is skipped) when chromium is not installed (`scripts/setup` installs it).
    pub async fn start() -> Option<Self> {
        let (driver, chromium) = ("/usr/bin/chromedriver", "/usr/bin/chromium");
        if !std::path::Path::new(driver).exists() || !std::path::Path::new(chromium).exists() {
            eprintln!("SKIPPED: {driver} or {chromium} missing (scripts/setup installs chromium and chromium-driver)");
            return None;
        }
        let port = free_port();
        // Its own process group: killing it (Proc) ends the chromium it started too.
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let proc = Proc { child, name: format!("chromedriver:{port}") };
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("chromedriver to answer", Duration::from_secs(20), || async {
            http.get(format!("{base}/status")).send().await.is_ok()
        })
        .await;
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,950"]
            }
        }}});
        let sent = http.post(format!("{base}/session")).body(caps.to_string()).send().await;
        let text = sent.expect("chromedriver answers").text().await.unwrap_or_default();
        let res: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("chromedriver said {text:?}: {e}"));
        let session = res["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {res}")).to_string();
        Some(Browser { _driver: proc, base, session, http })
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = self.http.request(method.parse().expect("method"), url);
        let req = if method == "GET" { req } else { req.body(body.to_string()) };
        let text = req.send().await.expect("chromedriver answers").text().await.expect("an answer");
        let res: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("webdriver {method} {path}: {text:?}: {e}"));
        if let Some(err) = res["value"]["error"].as_str() {
            panic!("webdriver {method} {path}: {err}: {}", res["value"]["message"]);
        }
        res["value"].clone()
    }

    pub async fn open(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    /// Run `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.command("POST", "/execute/sync", json!({ "script": script, "args": args })).await
    }

    /// The text of the first element matching `css`, or `None`.
    pub async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", json!([css]))
            .await;
        v.as_str().map(|s| s.trim().to_string())
    }

    /// Click the element matching `css` as a user would.
    pub async fn click(&self, css: &str) {
        let found = self.command("POST", "/element", json!({ "using": "css selector", "value": css })).await;
        let id = found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string();
        self.command("POST", &format!("/element/{id}/click"), json!({})).await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = self.command("GET", "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("base64 PNG")
    }
}
