//! sd_notify: a unix datagram socket standing in for systemd's
//! NOTIFY_SOCKET sees READY=1, STATUS lines and periodic WATCHDOG=1, and the
//! pings stop when the main loop's heartbeat goes stale.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use ringfenced::notify::{Heartbeat, Notifier, spawn_watchdog};

fn recv_all(sock: &UnixDatagram, within: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(_) => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_status_and_watchdog_pings_reach_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::to_socket(&path);

    notifier.ready().unwrap();
    notifier
        .status("running patch p1 step command\nsecond line")
        .unwrap();
    let msgs = recv_all(&sock, Duration::from_millis(300));
    assert_eq!(msgs[0], "READY=1\n");
    assert_eq!(
        msgs[1],
        "STATUS=running patch p1 step command second line\n"
    );

    // The main loop beats; the watchdog pings every 100 ms.
    let heartbeat = Heartbeat::new();
    let beat = heartbeat.clone();
    let main_loop = tokio::spawn(async move {
        loop {
            beat.beat();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let dog = spawn_watchdog(
        notifier.clone(),
        Duration::from_millis(100),
        heartbeat.clone(),
        Duration::from_millis(300),
    );
    let sock2 = sock.try_clone().unwrap();
    let msgs = tokio::task::spawn_blocking(move || recv_all(&sock2, Duration::from_millis(650)))
        .await
        .unwrap();
    let pings = msgs.iter().filter(|m| *m == "WATCHDOG=1\n").count();
    assert!(pings >= 4, "expected periodic pings, got {msgs:?}");

    // The main loop wedges: once its heartbeat is stale, pings stop.
    main_loop.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sock3 = sock.try_clone().unwrap();
    let _ = tokio::task::spawn_blocking(move || recv_all(&sock3, Duration::from_millis(10)))
        .await
        .unwrap();
    let sock4 = sock.try_clone().unwrap();
    let msgs = tokio::task::spawn_blocking(move || recv_all(&sock4, Duration::from_millis(400)))
        .await
        .unwrap();
    assert!(
        msgs.is_empty(),
        "a stale heartbeat must not be pinged for: {msgs:?}"
    );

    notifier.stopping().unwrap();
    let msgs = recv_all(&sock, Duration::from_millis(200));
    assert_eq!(msgs, vec!["STOPPING=1\n".to_string()]);
    dog.abort();
}

#[test]
fn without_a_socket_notifying_is_a_no_op() {
    let n = Notifier::default();
    assert!(!n.enabled());
    n.ready().unwrap();
    n.watchdog().unwrap();
}
