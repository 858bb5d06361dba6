//! The proxy's connection shares: one agent holding many slow connections uses up its own share of
//! `max_connections` and nobody else's; its connections beyond the share are closed at once (not left in the kernel's
//! backlog, where every agent would wait) and recorded, the records counting every refused connection. A test binary
//! of its own, because the limits are process-wide.

mod proxy_support;

use std::time::Duration;

use enforcer::model::Agent;
use enforcer::proxy::{set_limits, Limits};
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHARE: usize = 8;

fn agent(cgroup: &str) -> Agent {
    Agent {
        profile: Some("test-agent".into()),
        cgroup: Some(cgroup.into()),
        ..Agent::default()
    }
}

#[tokio::test]
async fn one_agent_flooding_with_slow_connections_does_not_starve_another() {
    assert!(set_limits(Limits {
        max_connections: 4 * SHARE,
        max_connections_per_agent: SHARE,
        pressure_head_timeout: Duration::from_secs(2),
        ..Limits::default()
    }));
    let p = start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await;
    let (up, seen) = http_upstream().await;
    let flooder = agent("/agents/flooder");

    // The flooder opens ten times its share of connections, each sending the start of a request head and then
    // nothing (a slow-loris).
    let mut slow = Vec::new();
    for _ in 0..10 * SHARE {
        let mut s = p.connect_as_agent(up, flooder.clone()).await;
        let _ = s
            .write_all(b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            .await;
        slow.push(s);
    }
    // Those beyond its share are closed at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 9 * SHARE, "connections beyond the flooder's share");

    // Another agent is served at once, while the flooder's share is still held.
    let mut other = p.connect_as_agent(up, agent("/agents/worker")).await;
    let req = format!("GET /work HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    other.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), other.read_to_end(&mut buf))
        .await
        .expect("the other agent was not served within a second")
        .unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(seen.count(), 1);

    // The flooder's held connections admitted under pressure (its share more than half used) get the short head
    // timeout; the first ones the normal one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut open = 0;
    for s in slow.iter_mut().take(SHARE) {
        let mut b = [0u8; 64];
        if tokio::time::timeout(Duration::from_millis(100), s.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert_eq!(
        open,
        SHARE / 2,
        "only the connections admitted without pressure stay open"
    );

    // Every refused connection is counted in the records (at most one a second for the agent).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records: Vec<_> = p
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["outcome"]["error"] == "connection_limit")
        .collect();
    assert!(!records.is_empty() && records.len() <= 3, "{records:#?}");
    let counted: u64 = records
        .iter()
        .map(|r| r["request"]["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, (9 * SHARE) as u64, "{records:#?}");
    for r in &records {
        assert_eq!(r["agent"]["cgroup"], "/agents/flooder", "{r}");
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
    }
}
