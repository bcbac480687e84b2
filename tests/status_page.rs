//! The status page in a real browser (headless chromium through chromedriver) against
//! a router with RabbitMQ, Redis and Kafka subscriptions: the figures move while
//! messages flow, a subscription paused from the page stops taking messages and
//! resumes, and a dead letter replayed from the page reaches the handler again.
//!
//! `MESSAGE_ROUTER_SCREENSHOT=docs/status-page.png` also saves the screenshot the
//! README shows.

use std::time::Duration;

use e2e::admin::ThreeBrokers;
use e2e::webdriver::Browser;
use e2e::*;

const WAIT: Duration = Duration::from_secs(60);
const NAMES: [&str; 3] = ["orders", "events", "clicks"];

fn cell(sub: &str, field: &str) -> String {
    format!("tr[data-subscription=\"{sub}\"] [data-field=\"{field}\"]")
}

async fn number(b: &Browser, css: &str) -> f64 {
    b.text(css).await.and_then(|t| t.replace(',', "").parse().ok()).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_live_figures_pauses_and_replays() {
    let Some(browser) = Browser::start().await else { return };
    let dir = Scratch::new("status-page");
    let mut b = ThreeBrokers::start(&dir, "").await;
    browser.open(&format!("http://127.0.0.1:{}/", b.router.admin)).await;
    for name in NAMES {
        wait_for(&format!("{name} shown running"), WAIT, || async {
            browser.text(&cell(name, "state")).await.as_deref() == Some("running")
        })
        .await;
    }
    assert_eq!(browser.text("#version").await.as_deref(), Some(env!("CARGO_PKG_VERSION")));

    // Figures move while messages flow: rates above zero, dead letters with a reason.
    for name in NAMES {
        let mut flow = batch(&format!("{name}-flow"), 40, |_| vec![("behave", "slow:20".to_string())]);
        flow.extend(batch(&format!("{name}-bad"), 1, |_| vec![("behave", "reject".to_string())]));
        b.publish(name, &flow).await;
    }
    for name in NAMES {
        wait_for(&format!("{name}: received and acked rates above 0"), WAIT, || async {
            number(&browser, &cell(name, "received")).await > 0.0 && number(&browser, &cell(name, "acked")).await > 0.0
        })
        .await;
        wait_for(&format!("{name}: one dead letter with its reason"), WAIT, || async {
            number(&browser, &cell(name, "dead_letters")).await == 1.0
                && browser
                    .text(&format!("tr[data-subscription=\"{name}\"] .reasons"))
                    .await
                    .is_some_and(|r| r.contains("HTTP 422"))
        })
        .await;
    }
    wait_for("the handler shown with its endpoint up", WAIT, || async {
        browser.text("tr[data-handler=\"php\"]").await.is_some_and(|t| t.contains("up") && t.contains("closed"))
    })
    .await;

    // Pause from the page: nothing new is handled; the others go on.
    browser.click("tr[data-subscription=\"orders\"] button[data-action=\"pause\"]").await;
    wait_for("orders shown paused", WAIT, || async {
        browser.text(&cell("orders", "state")).await.as_deref() == Some("paused")
    })
    .await;
    let held = batch("orders-held", 3, |_| Vec::new());
    b.publish("orders", &held).await;
    let control = batch("events-control", 1, |_| Vec::new());
    b.publish("events", &control).await;
    wait_for("events still handled", WAIT, || async { b.handled("events-control-0") == 1 }).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert!(held.iter().all(|(id, _, _)| b.handled(id) == 0), "a paused subscription handled a message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n") && shot.len() > 10_000, "a PNG of the page");
    std::fs::write(dir.path("status-page.png"), &shot).expect("save screenshot");
    if let Ok(path) = std::env::var("MESSAGE_ROUTER_SCREENSHOT") {
        std::fs::write(root().join(path), &shot).expect("save screenshot for the README");
    }
    browser.click("tr[data-subscription=\"orders\"] button[data-action=\"resume\"]").await;
    wait_for("the held messages handled after resume", WAIT, || async {
        held.iter().all(|(id, _, _)| b.handled(id) == 1)
    })
    .await;

    // Replay a dead letter from the page: the handler gets it again.
    for name in NAMES {
        let id = format!("{name}-bad-0");
        let before = b.handled(&id);
        let button = format!("button[data-replay][data-subscription=\"{name}\"]");
        wait_for(&format!("{name}: its dead letter listed"), WAIT, || async { browser.text(&button).await.is_some() })
            .await;
        browser.click(&button).await;
        wait_for(&format!("{name}: the replayed dead letter reaches the handler"), WAIT, || async {
            b.handled(&id) > before
        })
        .await;
    }
    drop(browser);
    assert_eq!(b.router.terminate(Duration::from_secs(20)), Some(0));
    b.cleanup().await;
}
