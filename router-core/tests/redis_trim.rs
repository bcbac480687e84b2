#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is the report
//! The retry stream is trimmed only to what every group has read and acked, against a
//! real Redis (127.0.0.1:6379 or REDIS_URL).

use redis::aio::MultiplexedConnection;
use router_core::transport::redis::trim_acked;

async fn connect() -> MultiplexedConnection {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url).expect("redis url");
    client.get_multiplexed_async_connection().await.expect("Redis is running (scripts/setup starts it)")
}

async fn ids(c: &mut MultiplexedConnection, stream: &str) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(c).await.expect("XRANGE");
    entries.into_iter().map(|(id, _)| id).collect()
}

#[tokio::test]
async fn trims_only_what_every_group_has_acked() {
    let mut c = connect().await;
    let stream = format!("core-trim-{}", uuid::Uuid::new_v4().simple());
    let cmd = |name: &str| redis::cmd(name);
    let _: () = cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .expect("group");
    let mut added = Vec::new();
    for i in 0..5 {
        let id: String = cmd("XADD").arg(&stream).arg("*").arg("n").arg(i).query_async(&mut c).await.expect("XADD");
        added.push(id);
    }
    let _: redis::Value = cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .expect("read");
    let _: i64 = cmd("XACK")
        .arg(&stream)
        .arg("g")
        .arg(&added[0])
        .arg(&added[1])
        .arg(&added[3])
        .query_async(&mut c)
        .await
        .expect("ack");

    // Entry 2 is still pending: it and everything after it stay, 3 acked or not.
    assert_eq!(trim_acked(&mut c, &stream).await.expect("trim"), 2);
    assert_eq!(ids(&mut c, &stream).await, added[2..]);

    // A second group that has read nothing yet holds everything.
    let _: () = cmd("XGROUP").arg("CREATE").arg(&stream).arg("late").arg("0").query_async(&mut c).await.expect("group");
    let _: i64 =
        cmd("XACK").arg(&stream).arg("g").arg(&added[2]).arg(&added[4]).query_async(&mut c).await.expect("ack");
    assert_eq!(trim_acked(&mut c, &stream).await.expect("trim"), 0);
    let _: i64 = cmd("XGROUP").arg("DESTROY").arg(&stream).arg("late").query_async(&mut c).await.expect("destroy");

    // All acked: only the last delivered entry stays (the trim point itself).
    assert_eq!(trim_acked(&mut c, &stream).await.expect("trim"), 2);
    assert_eq!(ids(&mut c, &stream).await, added[4..]);
    let _: i64 = cmd("DEL").arg(&stream).query_async(&mut c).await.expect("del");
}
