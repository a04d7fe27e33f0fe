//! One behavioural suite for both wave-store backends: every test body
//! below runs against redb under a temporary state dir and against a real
//! etcd member this test starts on loopback (Debian's `etcd-server`), so
//! the two implementations of the `WaveStore` seam are held to the same
//! contract. A few etcd-only tests follow (lease expiry, takeover).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence::time::SystemClock;
use ringfence_coordinator::settings::{Backend, Store as StoreSettings};
use ringfence_coordinator::store::{self, StoreError, WaveStore};
use ringfence_testkit::etcd::EtcdCluster;

/// A backend under test: its `[store]` settings, a state dir, and the etcd
/// member when there is one (killed on drop).
struct Under {
    dir: tempfile::TempDir,
    store: StoreSettings,
    etcd: Option<EtcdCluster>,
}

fn redb() -> Under {
    Under {
        dir: tempfile::tempdir().unwrap(),
        store: StoreSettings::default(),
        etcd: None,
    }
}

fn etcd() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(dir.path(), 1).unwrap();
    let store = StoreSettings {
        backend: Backend::Etcd,
        endpoints: cluster.endpoints(),
        prefix: "/ringfence-test".into(),
        tls: None,
    };
    Under {
        dir,
        store,
        etcd: Some(cluster),
    }
}

impl Under {
    fn open(&self, wave: &str) -> Result<WaveStore, StoreError> {
        self.open_in(self.dir.path(), wave)
    }
    /// Open from another coordinator's state dir (another machine).
    fn open_in(&self, state_dir: &Path, wave: &str) -> Result<WaveStore, StoreError> {
        WaveStore::open_in(&self.store, state_dir, wave, &SystemClock)
    }
}

/// The same test bodies against each backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod redb_backend {
            $( #[test] fn $name() { super::$name(&super::redb()); } )*
        }
        mod etcd_backend {
            $( #[test] fn $name() { super::$name(&super::etcd()); } )*
        }
    };
}

both_backends!(
    records_survive_reopen,
    sequences_only_grow_per_host_above_the_floor,
    concurrent_sequences_are_unique_and_durable,
    events_keep_their_order,
    a_halt_request_is_seen_and_only_the_seen_one_is_cleared,
    a_second_coordinator_is_refused_and_told_the_holder,
    wave_list_shows_state_and_holder,
    the_pool_ledger_is_shared_by_the_waves_of_a_store_and_held_by_one_at_a_time,
    a_host_belongs_to_one_active_wave_of_the_store,
);

fn records_survive_reopen(u: &Under) {
    {
        let s = u.open("w").unwrap();
        s.put_meta("plan", &serde_json::json!({"rings": 3}))
            .unwrap();
        s.put_host("gpu-1", &serde_json::json!({"phase": "patching"}))
            .unwrap();
        s.put_host("gpu-2", &serde_json::json!({"phase": "done"}))
            .unwrap();
        assert_eq!(s.get_meta::<serde_json::Value>("absent").unwrap(), None);
    }
    let s = u.open("w").unwrap();
    let plan: serde_json::Value = s.get_meta("plan").unwrap().unwrap();
    assert_eq!(plan["rings"], 3);
    let rec: serde_json::Value = s.get_host("gpu-1").unwrap().unwrap();
    assert_eq!(rec["phase"], "patching");
    let hosts: Vec<(String, serde_json::Value)> = s.hosts().unwrap();
    let ids: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(ids, ["gpu-1", "gpu-2"]);
}

fn sequences_only_grow_per_host_above_the_floor(u: &Under) {
    {
        let s = u.open("w").unwrap();
        assert_eq!(s.next_sequence("gpu-1", 0).unwrap(), 1);
        assert_eq!(s.next_sequence("gpu-1", 0).unwrap(), 2);
        assert_eq!(s.next_sequence("gpu-2", 0).unwrap(), 1);
        // The agent reported a higher mark: the next number is above it.
        assert_eq!(s.next_sequence("gpu-1", 10).unwrap(), 11);
    }
    let s = u.open("w").unwrap();
    // A stale (lower) floor never takes a number back.
    assert_eq!(s.next_sequence("gpu-1", 3).unwrap(), 12);
    assert_eq!(s.next_sequence("gpu-2", 0).unwrap(), 2);
}

fn concurrent_sequences_are_unique_and_durable(u: &Under) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = Arc::new(u.open("w").unwrap());
    let per_host = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let host = format!("gpu-{}", i % 5);
                let n = s.next_sequence_async(&host, 0).await.unwrap();
                s.put_host_async(&format!("h{i:03}"), &serde_json::json!({ "seq": n }))
                    .await
                    .unwrap();
                (host, n)
            }));
        }
        let mut per_host: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for t in tasks {
            let (h, n) = t.await.unwrap();
            per_host.entry(h).or_default().push(n);
        }
        per_host
    });
    for (h, mut ns) in per_host {
        ns.sort_unstable();
        assert_eq!(ns, (1..=20).collect::<Vec<u64>>(), "{h}");
    }
    drop(s);
    drop(rt);
    let s = u.open("w").unwrap();
    assert_eq!(s.hosts::<serde_json::Value>().unwrap().len(), 100);
    assert_eq!(s.next_sequence("gpu-3", 0).unwrap(), 21);
}

fn events_keep_their_order(u: &Under) {
    {
        let s = u.open("w").unwrap();
        for i in 0..12 {
            assert_eq!(s.append_event(&format!("e{i}")).unwrap(), i);
        }
    }
    let s = u.open("w").unwrap();
    assert_eq!(s.append_event(&"after reopen").unwrap(), 12);
    let ev: Vec<String> = s.events().unwrap();
    let mut want: Vec<String> = (0..12).map(|i| format!("e{i}")).collect();
    want.push("after reopen".into());
    assert_eq!(ev, want);
}

/// Poll `f` for up to `within`; the time it took once true.
fn within(within: Duration, f: impl Fn() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn a_halt_request_is_seen_and_only_the_seen_one_is_cleared(u: &Under) {
    let s = u.open("w").unwrap();
    assert!(!s.halt_requested());
    assert_eq!(s.halt_request(), None);
    assert!(!s.clear_halt(None).unwrap(), "nothing to clear");
    // `wave halt` from another process/machine: only the store settings.
    store::request_halt_in(&u.store, u.dir.path(), "w", 1).unwrap();
    let took = within(Duration::from_millis(500), || s.halt_requested());
    let took = took.expect("the driver sees the halt");
    assert!(
        took <= Duration::from_millis(50),
        "halt seen after {took:?}"
    );
    let seen = s.halt_request();
    assert!(seen.is_some());
    // The resume decided over the request it saw: cleared.
    assert!(!s.clear_halt(seen.as_deref()).unwrap());
    assert_eq!(s.halt_request(), None);
    assert!(within(Duration::from_millis(500), || !s.halt_requested()).is_some());
    // One requested after the resume began stands.
    store::request_halt_in(&u.store, u.dir.path(), "w", 2).unwrap();
    let seen = s.halt_request();
    store::request_halt_in(&u.store, u.dir.path(), "w", 2).unwrap();
    assert!(s.clear_halt(seen.as_deref()).unwrap());
    assert!(s.halt_request().is_some());
    assert!(within(Duration::from_millis(500), || s.halt_requested()).is_some());
}

fn a_second_coordinator_is_refused_and_told_the_holder(u: &Under) {
    let _a = u.open("w").unwrap();
    let other = tempfile::tempdir().unwrap();
    // With redb the other coordinator shares the state dir (one machine);
    // with etcd it has its own (another machine).
    let dir = if u.etcd.is_some() {
        other.path()
    } else {
        u.dir.path()
    };
    let err = u.open_in(dir, "w").unwrap_err();
    assert!(matches!(err, StoreError::Held { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("held by another coordinator"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    // Another wave is not held.
    u.open_in(dir, "w2").unwrap();
}

fn wave_list_shows_state_and_holder(u: &Under) {
    {
        let s = u.open("a").unwrap();
        s.write_status(&serde_json::json!({"phase": "completed"}))
            .unwrap();
    }
    let b = u.open("b").unwrap();
    b.write_status(&serde_json::json!({"phase": "running"}))
        .unwrap();
    let list = store::list_waves_in(&u.store, u.dir.path()).unwrap();
    let waves: Vec<(&str, &str, bool)> = list
        .iter()
        .map(|w| (w.wave.as_str(), w.phase.as_str(), w.holder.is_some()))
        .collect();
    assert_eq!(waves, [("a", "completed", false), ("b", "running", true)]);
    let holder = list[1].holder.as_deref().unwrap();
    assert!(
        holder.contains(&format!("pid {}", std::process::id())),
        "{holder}"
    );
    // `wave status` from anywhere reads the same snapshot.
    let text = store::read_status_in(&u.store, u.dir.path(), "b").unwrap();
    assert!(text.contains("running"), "{text}");
}

fn the_pool_ledger_is_shared_by_the_waves_of_a_store_and_held_by_one_at_a_time(u: &Under) {
    use ringfence_coordinator::store::LedgerEntry;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Two waves, driven by two coordinators (etcd: two machines).
    let other = tempfile::tempdir().unwrap();
    let a = u.open("a").unwrap();
    let b = if u.etcd.is_some() {
        u.open_in(other.path(), "b").unwrap()
    } else {
        u.open("b").unwrap()
    };
    let entry = |pool: &str, hosts: &[&str]| -> LedgerEntry {
        let mut e = LedgerEntry::new();
        e.insert(
            pool.to_string(),
            hosts.iter().map(|h| (*h).to_string()).collect(),
        );
        e
    };
    rt.block_on(async {
        {
            let mut g = a.ledger().lock().await.unwrap();
            assert!(g.others("a").is_empty());
            g.set("a", &entry("p", &["h1", "h2"])).unwrap();
            // Held: the other coordinator waits.
            assert!(
                tokio::time::timeout(Duration::from_millis(300), b.ledger().lock())
                    .await
                    .is_err()
            );
        }
        let mut g = b.ledger().lock().await.unwrap();
        let others = g.others("b");
        assert_eq!(others["p"].len(), 2);
        assert_eq!(others["p"]["h1"], "a");
        assert!(g.others("a").is_empty(), "its own entry is not another's");
        g.set("b", &entry("p", &["h3"])).unwrap();
        drop(g);
        let mut g = a.ledger().lock().await.unwrap();
        assert_eq!(g.others("a")["p"].keys().collect::<Vec<_>>(), ["h3"]);
        g.set("a", &LedgerEntry::new()).unwrap();
    });
    // Synchronous callers (`wave abort`) take it too.
    let g = b.ledger().lock_blocking().unwrap();
    assert!(g.others("b").is_empty(), "wave a left the ledger");
    drop(g);
    drop(a);
    drop(b);
    drop(rt);
}

fn a_host_belongs_to_one_active_wave_of_the_store(u: &Under) {
    let other = tempfile::tempdir().unwrap();
    let a = u.open("a").unwrap();
    let b = if u.etcd.is_some() {
        u.open_in(other.path(), "b").unwrap()
    } else {
        u.open("b").unwrap()
    };
    let hosts = |v: &[&str]| -> Vec<String> { v.iter().map(|h| (*h).to_string()).collect() };
    a.claim_hosts(&hosts(&["h1", "h2"])).unwrap();
    let err = b.claim_hosts(&hosts(&["h2", "h3"])).unwrap_err();
    assert!(matches!(err, StoreError::HostsInOtherWave { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("h2") && text.contains("`a`") && !text.contains("h3"),
        "{text}"
    );
    b.claim_hosts(&hosts(&["h3"])).unwrap();
    // Once wave a has completed its hosts are free.
    a.write_status(&serde_json::json!({"phase": "completed"}))
        .unwrap();
    b.claim_hosts(&hosts(&["h2", "h3"])).unwrap();
    // An aborted wave releases its hosts.
    b.release_hosts().unwrap();
    let c = if u.etcd.is_some() {
        u.open_in(other.path(), "c").unwrap()
    } else {
        u.open("c").unwrap()
    };
    c.claim_hosts(&hosts(&["h2", "h3"])).unwrap();
}

// ---- etcd only: what a lease changes ----

/// A raw etcd client beside the store (another party acting on the cluster).
async fn raw(u: &Under) -> etcd_client::Client {
    etcd_client::Client::connect(u.store.endpoints.clone(), None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_coordinator_past_its_lease_can_write_nothing_and_the_next_numbers_are_above_its() {
    let u = etcd();
    let old = u.open("w").unwrap();
    assert_eq!(old.next_sequence("gpu-1", 0).unwrap(), 1);
    assert_eq!(old.next_sequence("gpu-1", 0).unwrap(), 2);
    // The old driver's lease is gone (as when it was frozen past its TTL):
    // revoke every lease on the cluster.
    let mut c = raw(&u).await;
    for l in c.leases().await.unwrap().leases() {
        c.lease_revoke(l.id()).await.unwrap();
    }
    // A second coordinator on another machine takes the wave over.
    let other = tempfile::tempdir().unwrap();
    let new = u.open_in(other.path(), "w").unwrap();
    assert!(new.holds_lock());
    // Every write of the old one fails, typed, and nothing it had reserved
    // is reused: the new holder's numbers are above the old one's.
    let err = old
        .put_host("gpu-1", &serde_json::json!({"phase": "dispatched"}))
        .unwrap_err();
    assert!(matches!(err, StoreError::LostLock { .. }), "{err}");
    assert!(matches!(
        old.next_sequence("gpu-1", 0),
        Err(StoreError::LostLock { .. })
    ));
    assert!(matches!(
        old.next_sequence_async("gpu-2", 0).await,
        Err(StoreError::LostLock { .. })
    ));
    assert!(matches!(
        old.append_event(&"late"),
        Err(StoreError::LostLock { .. })
    ));
    assert!(!old.holds_lock());
    assert_eq!(new.next_sequence("gpu-1", 0).unwrap(), 3);
    assert_eq!(new.get_host::<serde_json::Value>("gpu-1").unwrap(), None);
    assert!(new.events::<String>().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_lock_key_taken_by_another_fences_the_old_holder_even_before_its_lease_ends() {
    let u = etcd();
    let old = u.open("w").unwrap();
    // Someone deletes and re-creates the lock key (a new create revision):
    // the old holder's lease is still alive, but its fence no longer holds.
    let mut c = raw(&u).await;
    c.delete("/ringfence-test/waves/w/lock", None)
        .await
        .unwrap();
    c.put(
        "/ringfence-test/waves/w/lock",
        "pid 1 on elsewhere since 0",
        None,
    )
    .await
    .unwrap();
    let err = old.put_meta("state", &1).unwrap_err();
    assert!(matches!(err, StoreError::LostLock { .. }), "{err}");
    assert!(err.to_string().contains("stops dispatching"), "{err}");
    // And a third coordinator is refused, told who holds it.
    let err = u
        .open_in(tempfile::tempdir().unwrap().path(), "w")
        .unwrap_err();
    assert!(err.to_string().contains("elsewhere"), "{err}");
}

#[test]
fn etcd_the_lock_is_free_again_once_its_holder_closes_the_wave() {
    let u = etcd();
    drop(u.open("w").unwrap());
    // Given back at once (lease revoked), not after the TTL.
    let t0 = Instant::now();
    u.open("w").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn etcd_unreachable_is_an_etcd_error_naming_the_endpoints() {
    let addr = ringfence_testkit::net::free_loopback().unwrap();
    let store = StoreSettings {
        backend: Backend::Etcd,
        endpoints: vec![format!("http://{addr}")],
        prefix: "/x".into(),
        tls: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let err = WaveStore::open_in(&store, dir.path(), "w", &SystemClock).unwrap_err();
    assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// `ringfence pki …` as an operator runs it.
fn pki(args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .arg("pki")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringfence pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scenario 7: client TLS to etcd with certificates from `ringfence pki`:
/// the etcd member serves TLS with a `host` certificate for `localhost` and
/// requires client certificates; the coordinator's `ops` certificate opens
/// the wave, and a store without a client certificate (or with another
/// CA's) gets nothing.
#[test]
fn etcd_client_tls_with_certificates_from_ringfence_pki() {
    use ringfence_coordinator::settings::StoreTls;
    use ringfence_testkit::etcd::EtcdServerTls;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    pki(&["init", "--dir", ca_s, "--trust-domain", "etcd.test"]);
    pki(&[
        "issue",
        "--dir",
        ca_s,
        "--role",
        "host",
        "--name",
        "localhost",
    ]);
    pki(&[
        "issue",
        "--dir",
        ca_s,
        "--role",
        "ops",
        "--name",
        "coordinator",
    ]);
    let etcd = EtcdCluster::start_tls(
        dir.path(),
        &EtcdServerTls {
            cert: ca.join("host-localhost.pem"),
            key: ca.join("host-localhost.key"),
            ca: ca.join("ca.pem"),
        },
    )
    .unwrap();
    let mut store = StoreSettings {
        backend: Backend::Etcd,
        endpoints: etcd.endpoints(),
        prefix: "/tls".into(),
        tls: Some(StoreTls {
            cert: ca.join("ops-coordinator.pem"),
            key: ca.join("ops-coordinator.key"),
            ca: ca.join("ca.pem"),
        }),
    };
    assert!(store.endpoints[0].starts_with("https://localhost:"));
    let state = tempfile::tempdir().unwrap();
    {
        let s = WaveStore::open_in(&store, state.path(), "w", &SystemClock).unwrap();
        s.put_host("gpu-1", &serde_json::json!({"phase": "done"}))
            .unwrap();
        assert_eq!(s.next_sequence("gpu-1", 0).unwrap(), 1);
    }
    let s = WaveStore::open_in(&store, state.path(), "w", &SystemClock).unwrap();
    let rec: serde_json::Value = s.get_host("gpu-1").unwrap().unwrap();
    assert_eq!(rec["phase"], "done");
    drop(s);

    // A client certificate of another CA is refused by etcd.
    let other = dir.path().join("other-ca");
    let other_s = other.to_str().unwrap();
    pki(&["init", "--dir", other_s, "--trust-domain", "other.test"]);
    pki(&[
        "issue", "--dir", other_s, "--role", "ops", "--name", "intruder",
    ]);
    store.tls = Some(StoreTls {
        cert: other.join("ops-intruder.pem"),
        key: other.join("ops-intruder.key"),
        ca: ca.join("ca.pem"),
    });
    let err = WaveStore::open_in(&store, state.path(), "w", &SystemClock).unwrap_err();
    assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
    // A missing key file is named.
    store.tls = Some(StoreTls {
        cert: ca.join("ops-coordinator.pem"),
        key: ca.join("absent.key"),
        ca: ca.join("ca.pem"),
    });
    let err = WaveStore::open_in(&store, state.path(), "w", &SystemClock).unwrap_err();
    assert!(err.to_string().contains("absent.key"), "{err}");
}
