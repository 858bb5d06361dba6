//! The proxy's connection cap: with every slot held by an idle client, a new client is not served until one of
//! them leaves. A test binary of its own, because the limits are process-wide.

mod proxy_support;

use std::time::Duration;

use enforcer::proxy::{set_limits, Limits};
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn clients_beyond_the_connection_cap_wait_for_a_free_slot() {
    assert!(set_limits(Limits {
        max_connections: 2,
        ..Limits::default()
    }));
    let p = start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await;
    let (up, seen) = http_upstream().await;

    // Two idle clients hold both slots.
    let idle_a = p.connect_as(up).await;
    let idle_b = p.connect_as(up).await;
    // Give the proxy time to accept them, so the third is the one left waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut third = p.connect_as(up).await;
    let req = format!("GET /x HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    third.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut buf)).await;
    assert!(early.is_err(), "served beyond the cap: {buf:?}");
    assert_eq!(seen.count(), 0);

    // One idle client leaves: the waiting one is served.
    drop(idle_a);
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut buf))
        .await
        .expect("the waiting client is served once a slot is free")
        .unwrap();
    let resp = String::from_utf8_lossy(&buf);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(seen.count(), 1);
    drop(idle_b);
}
