//! The etcd backend (`[store] backend = "etcd"`): the wave's state lives in
//! an etcd v3 cluster, so any coordinator configured with the same
//! endpoints and prefix can resume a wave whose driver died, and two
//! coordinators can never drive one wave at once.
//!
//! # Key layout
//!
//! Under `<prefix>/waves/<wave>/`:
//!
//! | key | value |
//! |---|---|
//! | `lock` | the holder's note (pid, host, since); attached to the holder's lease |
//! | `meta/<key>` | wave-level records (spec, plan, sequencer state, decisions), JSON |
//! | `hosts/<host>` | host records (the write-ahead task records), JSON |
//! | `seq/<host>` | the host's last task sequence number, decimal |
//! | `events/<index, 20 digits>` | the audit events, JSON, in order |
//! | `status` | the status snapshot `wave status` reads |
//! | `halt` | present while a halt is requested (`wave halt`); its text identifies the request |
//!
//! and `<prefix>/index/<wave>` (empty) names every wave ever opened, for
//! `wave list`; `<prefix>/pools/ledger` is the pool ledger shared by every
//! wave of the prefix, taken under etcd's mutex `<prefix>/pools/mutex`
//! (`EtcdLedger`), and `<prefix>/claims` the hosts of every active wave
//! (a host belongs to one active wave), changed under the same mutex.
//! Evidence packets stay files under the state dir of the coordinator that
//! wrote them (they are signed, self-contained and large; etcd's default
//! request limit is 1.5 MiB); neither packets nor digests go to etcd yet.
//!
//! # Lock and fencing
//!
//! The wave is driven by whoever holds `lock`: a key put with
//! `create_revision == 0` (absent) in one transaction, attached to a lease
//! of [`DEFAULT_LEASE_TTL_S`] seconds that a task of this store keeps alive
//! every third of the TTL. The lock key's create revision is the holder's
//! *fencing token*: every write of this store is a transaction that first
//! compares `create_revision(lock) == token`, so once the lease expired
//! (the process was frozen or partitioned past its TTL) or another
//! coordinator took the key, every write fails with
//! [`StoreError::LostLock`] and nothing is dispatched, because nothing is
//! sent without a durable write-ahead.
//!
//! The agents are the last fence: per-host task sequence numbers
//! (`seq/<host>`) are reserved by the same fenced transactions, so a later
//! holder's numbers start above every number an earlier holder ever
//! reserved, and an agent that has accepted a task from the new holder
//! refuses any task of the old one by its existing `sequence_not_increasing`
//! check. The token is not put in the high bits of the sequence: the
//! agents refuse a sequence more than `MAX_SEQUENCE_JUMP` (10⁶) above their
//! high-water mark, and etcd revisions grow by millions over a large wave.
//! Sequence numbers stay plain counters, so a host's numbers keep growing
//! across redb and etcd.
//!
//! # Sync over async
//!
//! The [`WaveStore`](super::WaveStore) API is synchronous and called from
//! async code (and from plain threads). The etcd client runs on a small
//! runtime of its own (two worker threads) owned by the store: a
//! synchronous call spawns its request there and waits on a channel (the
//! calling thread blocks as it does for a redb fsync; it never calls
//! `block_on` inside the caller's runtime, which would panic), and the
//! `_async` calls await the spawned request's join handle. The lease
//! keepalive and the halt-key watch are tasks of that runtime too, so they
//! keep running while the caller's runtime is busy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{StoreError, Table, WaveListing};
use crate::settings::Store as StoreSettings;

/// Lease TTL of the wave lock, seconds: a frozen or partitioned driver
/// loses the wave this long after its last keepalive.
pub const DEFAULT_LEASE_TTL_S: i64 = 5;

/// Timeout of one etcd request. Short: a write proposed to a follower
/// whose leader just died waits server-side for seconds before it fails;
/// a fresh try after a new leader is elected (~1 s) succeeds at once (see
/// [`retrying`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of connecting to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most keys read in one range request.
const PAGE: i64 = 1000;

/// `<prefix>/waves/<wave>`.
fn wave_base(prefix: &str, wave: &str) -> String {
    format!("{prefix}/waves/{wave}")
}

fn endpoints_of(s: &StoreSettings) -> String {
    s.endpoints.join(",")
}

fn etcd_err(s: &StoreSettings, e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd {
        endpoints: endpoints_of(s),
        reason: e.to_string(),
    }
}

/// Connection options from `[store]`: timeouts and, with `[store.tls]`,
/// the client certificate and CA.
fn connect_options(s: &StoreSettings) -> Result<ConnectOptions, StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = &s.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| StoreError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert = read(&tls.cert)?;
        let key = read(&tls.key)?;
        let ca = read(&tls.ca)?;
        opts = opts.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        );
    }
    Ok(opts)
}

/// Whether the holder note (`pid P on HOST since MS`) names a process of
/// this machine that no longer exists.
fn died_here(note: &str) -> bool {
    let mut words = note.split_whitespace();
    let (Some("pid"), Some(pid), Some("on"), Some(host)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    let here = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    host == here
        && pid > 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

fn runtime(s: &StoreSettings) -> Result<tokio::runtime::Runtime, StoreError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ringfence-etcd")
        .enable_all()
        .build()
        .map_err(|e| etcd_err(s, format!("cannot start the etcd client runtime: {e}")))
}

/// Run `f` with a fresh client on a runtime of its own, on a thread of
/// its own (callable from inside another runtime): one-shot commands
/// such as `wave halt` and `wave list`.
fn one_shot<T, F, Fut>(s: &StoreSettings, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, StoreError>> + Send,
{
    let s = s.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| etcd_err(&s, e))?;
        rt.block_on(async {
            let client = Client::connect(&s.endpoints, Some(connect_options(&s)?))
                .await
                .map_err(|e| etcd_err(&s, e))?;
            f(client).await
        })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(StoreError::Etcd {
            endpoints: String::new(),
            reason: "the etcd client thread panicked".into(),
        })
    })
}

/// An open etcd wave store holding the wave's lock.
pub(super) struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Client,
    settings: StoreSettings,
    wave: String,
    base: String,
    lease: i64,
    /// The lock key's create revision: the fencing token.
    token: i64,
    lost: Arc<AtomicBool>,
    halted: Arc<AtomicBool>,
    ledger_local: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.settings.endpoints)
            .field("base", &self.base)
            .field("lease", &self.lease)
            .field("token", &self.token)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Give the lock back at once (the next holder need not wait for
        // the TTL), then stop the runtime without waiting on its tasks
        // (allowed from inside another runtime, unlike a plain drop).
        if !self.lost.load(Ordering::SeqCst) {
            let mut c = self.client.clone();
            let lease = self.lease;
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            self.handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connect, take the wave's lock (refused with the holder named when
    /// another coordinator holds it) and start the keepalive and the
    /// halt watch.
    pub(super) fn open(
        s: &StoreSettings,
        wave: &str,
        note: &str,
        ttl_s: i64,
    ) -> Result<Self, StoreError> {
        let rt = runtime(s)?;
        let handle = rt.handle().clone();
        let base = wave_base(&s.prefix, wave);
        let lock_key = format!("{base}/lock");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let s = s.clone();
            let note = note.to_string();
            let wave = wave.to_string();
            let index_key = format!("{}/index/{wave}", s.prefix);
            handle.spawn(async move {
                let r = async {
                    let mut client = Client::connect(&s.endpoints, Some(connect_options(&s)?))
                        .await
                        .map_err(|e| etcd_err(&s, e))?;
                    let lease = client
                        .lease_grant(ttl_s, None)
                        .await
                        .map_err(|e| etcd_err(&s, e))?
                        .id();
                    // A holder that died keeps the lock until its lease
                    // lapses (at most one TTL; then try again), except one
                    // that died on this machine (its pid is gone): its
                    // lease is revoked and the lock taken at once.
                    let kv = loop {
                        let txn = Txn::new()
                            .when([Compare::create_revision(
                                lock_key.clone(),
                                CompareOp::Equal,
                                0,
                            )])
                            .and_then([
                                TxnOp::put(
                                    lock_key.clone(),
                                    note.clone(),
                                    Some(PutOptions::new().with_lease(lease)),
                                ),
                                TxnOp::put(index_key.clone(), "", None),
                                TxnOp::get(lock_key.clone(), None),
                            ])
                            .or_else([TxnOp::get(lock_key.clone(), None)]);
                        let resp = client.txn(txn).await.map_err(|e| etcd_err(&s, e))?;
                        let kv = resp.op_responses().into_iter().find_map(|r| match r {
                            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                            _ => None,
                        });
                        if resp.succeeded() {
                            break kv;
                        }
                        let holder = kv
                            .as_ref()
                            .and_then(|kv| kv.value_str().ok().map(str::to_string))
                            .filter(|h| !h.is_empty())
                            .unwrap_or_else(|| "unknown holder".into());
                        if let Some(kv) = &kv
                            && died_here(&holder)
                        {
                            let _ = client.lease_revoke(kv.lease()).await;
                            continue;
                        }
                        let _ = client.lease_revoke(lease).await;
                        return Err(StoreError::Held { wave, holder });
                    };
                    let token = kv.map(|kv| kv.create_revision()).unwrap_or(0);
                    if token == 0 {
                        return Err(etcd_err(&s, "the lock key vanished right after it was put"));
                    }
                    Ok((client, lease, token))
                }
                .await;
                let _ = tx.send(r);
            });
        }
        let opened = rx
            .recv()
            .map_err(|_| etcd_err(s, "the etcd client runtime stopped"))
            .and_then(|r| r);
        let (client, lease, token) = match opened {
            Ok(o) => o,
            Err(e) => {
                // Not a plain drop: this may run inside the caller's runtime.
                rt.shutdown_background();
                return Err(e);
            }
        };
        let store = Self {
            rt: Some(rt),
            handle,
            client,
            settings: s.clone(),
            wave: wave.to_string(),
            base,
            lease,
            token,
            lost: Arc::new(AtomicBool::new(false)),
            halted: Arc::new(AtomicBool::new(false)),
            ledger_local: Arc::new(tokio::sync::Mutex::new(())),
        };
        store.spawn_keepalive(ttl_s);
        let halt = store.halt_request()?;
        store.halted.store(halt.is_some(), Ordering::SeqCst);
        store.spawn_halt_watch();
        Ok(store)
    }

    /// Keep the lease alive every third of its TTL; once a keepalive says
    /// the lease is gone, or none succeeded for a whole TTL, the lock is
    /// lost for good.
    fn spawn_keepalive(&self, ttl_s: i64) {
        let mut client = self.client.clone();
        let lease = self.lease;
        let lost = self.lost.clone();
        let ttl = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(1).max(1));
        self.handle.spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            let mut keeper = None;
            loop {
                if last_ok.elapsed() >= ttl {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                if keeper.is_none() {
                    keeper = client.lease_keep_alive(lease).await.ok();
                }
                let mut alive = None;
                if let Some((k, stream)) = keeper.as_mut() {
                    let r = tokio::time::timeout(ttl / 3, async {
                        k.keep_alive().await?;
                        stream.message().await
                    })
                    .await;
                    alive = match r {
                        Ok(Ok(Some(resp))) => Some(resp.ttl() > 0),
                        _ => None,
                    };
                }
                match alive {
                    Some(true) => last_ok = tokio::time::Instant::now(),
                    Some(false) => {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    None => keeper = None,
                }
                tokio::time::sleep(ttl / 3).await;
            }
        });
    }

    /// Follow the halt key: `halt_requested` is then a memory read, and a
    /// `wave halt` from any machine is seen within a round trip.
    fn spawn_halt_watch(&self) {
        let mut client = self.client.clone();
        let key = format!("{}/halt", self.base);
        let halted = self.halted.clone();
        self.handle.spawn(async move {
            loop {
                // (Re)read, then watch from the next revision: no change is missed.
                let Ok(resp) = client.get(key.clone(), None).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                halted.store(!resp.kvs().is_empty(), Ordering::SeqCst);
                let rev = resp.header().map_or(0, |h| h.revision());
                let watch = client
                    .watch(
                        key.clone(),
                        Some(etcd_client::WatchOptions::new().with_start_revision(rev + 1)),
                    )
                    .await;
                let Ok(mut stream) = watch else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                while let Ok(Some(msg)) = stream.message().await {
                    for ev in msg.events() {
                        halted.store(ev.event_type() == EventType::Put, Ordering::SeqCst);
                    }
                }
            }
        });
    }

    /// Where the records live, for error messages.
    pub(super) fn location(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!(
            "etcd {} {}",
            endpoints_of(&self.settings),
            self.base
        ))
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        etcd_err(&self.settings, e)
    }

    fn lost_lock(&self, reason: &str) -> StoreError {
        self.lost.store(true, Ordering::SeqCst);
        StoreError::LostLock {
            wave: self.wave.clone(),
            reason: reason.to_string(),
        }
    }

    /// Run the request `f` makes on the store's runtime, retried while etcd
    /// is unavailable (see [`retrying`]), and wait for it from this thread.
    fn block<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        block_in(&self.handle, &self.lost, &self.wave, &self.settings, f)
    }

    /// [`block`](Self::block), awaited.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (lost, wave) = (self.lost.clone(), self.wave.clone());
        self.handle
            .spawn(async move { retrying(&lost, &wave, f).await })
            .await
            .map_err(|e| self.err(format!("etcd request task failed: {e}")))?
    }

    /// What a request needs, owned (cloned into each try).
    fn ctx(&self) -> Ctx {
        Ctx {
            c: self.client.clone(),
            s: self.settings.clone(),
            fence: self.fence(),
        }
    }

    fn key(&self, t: Table, key: &str) -> String {
        match t {
            Table::Meta => format!("{}/meta/{key}", self.base),
            Table::Hosts => format!("{}/hosts/{key}", self.base),
        }
    }

    /// The fence every write carries: the lock key is still ours.
    fn fence(&self) -> Compare {
        Compare::create_revision(format!("{}/lock", self.base), CompareOp::Equal, self.token)
    }

    fn check_lost(&self) -> Result<(), StoreError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_lock("the lock's lease expired"));
        }
        Ok(())
    }

    pub(super) fn put(&self, t: Table, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_lost()?;
        let (ctx, key, bytes) = (self.ctx(), self.key(t, key), bytes.to_vec());
        if self.block(move || fenced_put(ctx.clone(), key.clone(), bytes.clone()))? {
            Ok(())
        } else {
            Err(self.lost_lock("the lock key is no longer this coordinator's"))
        }
    }

    pub(super) async fn put_async(
        &self,
        t: Table,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.check_lost()?;
        let (ctx, key) = (self.ctx(), self.key(t, key));
        if self
            .run(move || fenced_put(ctx.clone(), key.clone(), bytes.clone()))
            .await?
        {
            Ok(())
        } else {
            Err(self.lost_lock("the lock key is no longer this coordinator's"))
        }
    }

    pub(super) fn get(&self, t: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (ctx, k) = (self.ctx(), self.key(t, key));
        self.block(move || {
            let (mut c, s, k) = (ctx.c.clone(), ctx.s.clone(), k.clone());
            async move {
                let r = c.get(k, None).await.map_err(|e| etcd_err(&s, e))?;
                Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
            }
        })
    }

    /// Every key under `prefix`, in key order, read in pages.
    fn range(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let ctx = self.ctx();
        self.block(move || range(ctx.c.clone(), ctx.s.clone(), prefix.clone()))
    }

    pub(super) fn hosts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let p = format!("{}/hosts/", self.base);
        Ok(self
            .range(p.clone())?
            .into_iter()
            .map(|(k, v)| (k[p.len()..].to_string(), v))
            .collect())
    }

    pub(super) fn next_sequence(&self, host: &str, floor: u64) -> Result<u64, StoreError> {
        self.check_lost()?;
        let (ctx, key) = (self.ctx(), format!("{}/seq/{host}", self.base));
        self.block(move || next_sequence(ctx.clone(), key.clone(), floor))?
            .ok_or_else(|| self.lost_lock("the lock key is no longer this coordinator's"))
    }

    pub(super) async fn next_sequence_async(
        &self,
        host: &str,
        floor: u64,
    ) -> Result<u64, StoreError> {
        self.check_lost()?;
        let (ctx, key) = (self.ctx(), format!("{}/seq/{host}", self.base));
        self.run(move || next_sequence(ctx.clone(), key.clone(), floor))
            .await?
            .ok_or_else(|| self.lost_lock("the lock key is no longer this coordinator's"))
    }

    pub(super) fn append_event(&self, bytes: &[u8]) -> Result<u64, StoreError> {
        self.check_lost()?;
        let c = self.client.clone();
        let prefix = format!("{}/events/", self.base);
        let fence = self.fence();
        let s = self.settings.clone();
        let bytes = bytes.to_vec();
        let r = self.block(move || {
            let (mut c, prefix, fence, s, bytes) = (
                c.clone(),
                prefix.clone(),
                fence.clone(),
                s.clone(),
                bytes.clone(),
            );
            async move {
                loop {
                    let last = c
                        .get(
                            prefix.clone(),
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_keys_only()
                                    .with_sort(
                                        etcd_client::SortTarget::Key,
                                        etcd_client::SortOrder::Descend,
                                    )
                                    .with_limit(1),
                            ),
                        )
                        .await
                        .map_err(|e| etcd_err(&s, e))?;
                    let idx = last
                        .kvs()
                        .first()
                        .and_then(|kv| kv.key_str().ok())
                        .and_then(|k| k.get(prefix.len()..))
                        .and_then(|n| n.parse::<u64>().ok())
                        .map_or(0, |n| n + 1);
                    let key = format!("{prefix}{idx:020}");
                    let txn = Txn::new()
                        .when([
                            fence.clone(),
                            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        ])
                        .and_then([TxnOp::put(key, bytes.clone(), None)]);
                    if c.txn(txn).await.map_err(|e| etcd_err(&s, e))?.succeeded() {
                        return Ok(Some(idx));
                    }
                    if !c
                        .txn(Txn::new().when([fence.clone()]))
                        .await
                        .map_err(|e| etcd_err(&s, e))?
                        .succeeded()
                    {
                        return Ok(None);
                    }
                }
            }
        })?;
        r.ok_or_else(|| self.lost_lock("the lock key is no longer this coordinator's"))
    }

    pub(super) fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let p = format!("{}/events/", self.base);
        self.range(p.clone())?
            .into_iter()
            .map(|(k, v)| {
                k[p.len()..]
                    .parse::<u64>()
                    .map(|i| (i, v))
                    .map_err(|_| StoreError::Corrupt {
                        path: self.location(),
                        key: k.clone(),
                        reason: "not an event index".into(),
                    })
            })
            .collect()
    }

    pub(super) fn write_status(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_lost()?;
        let (ctx, key, bytes) = (self.ctx(), format!("{}/status", self.base), bytes.to_vec());
        if self.block(move || fenced_put(ctx.clone(), key.clone(), bytes.clone()))? {
            Ok(())
        } else {
            Err(self.lost_lock("the lock key is no longer this coordinator's"))
        }
    }

    pub(super) fn halt_requested(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    pub(super) fn halt_request(&self) -> Result<Option<String>, StoreError> {
        let (ctx, k) = (self.ctx(), format!("{}/halt", self.base));
        self.block(move || {
            let (mut c, s, k) = (ctx.c.clone(), ctx.s.clone(), k.clone());
            async move {
                let r = c.get(k, None).await.map_err(|e| etcd_err(&s, e))?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
            }
        })
    }

    /// Delete the halt request if it is still `seen`; `true` when one
    /// stands (a newer request, or one when none was seen).
    pub(super) fn clear_halt(&self, seen: Option<&str>) -> Result<bool, StoreError> {
        self.check_lost()?;
        let now = self.halt_request()?;
        let Some(now) = now else {
            return Ok(false);
        };
        let Some(seen) = seen.filter(|s| *s == now) else {
            return Ok(true);
        };
        let (ctx, k) = (self.ctx(), format!("{}/halt", self.base));
        let seen = seen.to_string();
        let (cleared, ours) = self.block(move || {
            let Ctx { mut c, s, fence } = ctx.clone();
            let (k, seen) = (k.clone(), seen.clone());
            async move {
                let txn = Txn::new()
                    .when([
                        fence.clone(),
                        Compare::value(k.clone(), CompareOp::Equal, seen),
                    ])
                    .and_then([TxnOp::delete(k, None)]);
                let done = c.txn(txn).await.map_err(|e| etcd_err(&s, e))?.succeeded();
                if done {
                    return Ok((true, true));
                }
                let ours = c
                    .txn(Txn::new().when([fence]))
                    .await
                    .map_err(|e| etcd_err(&s, e))?
                    .succeeded();
                Ok((false, ours))
            }
        })?;
        if !ours {
            return Err(self.lost_lock("the lock key is no longer this coordinator's"));
        }
        if cleared {
            self.halted.store(false, Ordering::SeqCst);
        }
        Ok(!cleared)
    }

    /// The pool ledger of this store's prefix.
    pub(super) fn ledger(&self) -> EtcdLedger {
        EtcdLedger {
            handle: self.handle.clone(),
            ctx: self.ctx(),
            lease: self.lease,
            lost: self.lost.clone(),
            wave: self.wave.clone(),
            mutex: format!("{}/pools/mutex", self.settings.prefix),
            key: format!("{}/pools/ledger", self.settings.prefix),
            local: self.ledger_local.clone(),
        }
    }

    pub(super) fn holds_lock(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }
}

/// [`EtcdStore::block`] for whoever holds the runtime's handle.
fn block_in<T, F, Fut>(
    handle: &tokio::runtime::Handle,
    lost: &Arc<AtomicBool>,
    wave: &str,
    settings: &StoreSettings,
    f: F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (lost, wave) = (lost.clone(), wave.to_string());
    handle.spawn(async move {
        let _ = tx.send(retrying(&lost, &wave, f).await);
    });
    rx.recv()
        .map_err(|_| etcd_err(settings, "the etcd client runtime stopped"))?
}

/// The pool ledger on etcd: one key, `<prefix>/pools/ledger` (the same
/// JSON as `pools.json`: wave → pool → hosts out of service), read and
/// written under etcd's distributed mutex `<prefix>/pools/mutex` held with
/// the wave's lease (a coordinator that dies lets it go with its lease),
/// and written only while the wave's lock is still held (the fence).
#[derive(Clone)]
pub(super) struct EtcdLedger {
    handle: tokio::runtime::Handle,
    ctx: Ctx,
    lease: i64,
    lost: Arc<AtomicBool>,
    wave: String,
    mutex: String,
    key: String,
    /// One guard at a time in this process: the etcd mutex is per lease.
    local: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for EtcdLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLedger")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// One try of taking the ledger: the mutex key and the ledger's bytes.
type LockFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Vec<u8>, Option<Vec<u8>>), StoreError>> + Send>,
>;

/// The etcd pool ledger, held: the mutex key this coordinator owns.
pub(super) struct EtcdLedgerGuard {
    ledger: EtcdLedger,
    lock_key: Vec<u8>,
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::fmt::Debug for EtcdLedgerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLedgerGuard")
            .field("lock_key", &String::from_utf8_lossy(&self.lock_key))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdLedgerGuard {
    fn drop(&mut self) {
        // Unlock on the store's runtime; this process's next guard waits
        // (the local mutex goes with the task) until etcd has let go.
        let mut c = self.ledger.ctx.c.clone();
        let key = std::mem::take(&mut self.lock_key);
        let local = self.local.take();
        self.ledger.handle.spawn(async move {
            for _ in 0..20 {
                if c.unlock(key.clone()).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(local);
        });
    }
}

impl EtcdLedger {
    pub(super) fn location(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("etcd {} {}", endpoints_of(&self.ctx.s), self.key))
    }

    fn lock_once(&self) -> impl FnMut() -> LockFuture + Send + 'static {
        let (ctx, lease, mutex, key) = (
            self.ctx.clone(),
            self.lease,
            self.mutex.clone(),
            self.key.clone(),
        );
        move || {
            let (mut c, s, mutex, key) = (ctx.c.clone(), ctx.s.clone(), mutex.clone(), key.clone());
            Box::pin(async move {
                // The same lease asking again gets the same mutex key: a
                // retried lock whose answer was lost does not deadlock.
                let l = c
                    .lock(
                        mutex,
                        Some(etcd_client::LockOptions::new().with_lease(lease)),
                    )
                    .await
                    .map_err(|e| etcd_err(&s, e))?;
                let r = c.get(key, None).await.map_err(|e| etcd_err(&s, e))?;
                Ok((
                    l.key().to_vec(),
                    r.kvs().first().map(|kv| kv.value().to_vec()),
                ))
            })
        }
    }

    pub(super) async fn lock(&self) -> Result<(EtcdLedgerGuard, Option<Vec<u8>>), StoreError> {
        let local = self.local.clone().lock_owned().await;
        let (lost, wave, f) = (self.lost.clone(), self.wave.clone(), self.lock_once());
        let (lock_key, bytes) = self
            .handle
            .spawn(async move { retrying(&lost, &wave, f).await })
            .await
            .map_err(|e| etcd_err(&self.ctx.s, format!("etcd request task failed: {e}")))??;
        Ok((
            EtcdLedgerGuard {
                ledger: self.clone(),
                lock_key,
                local: Some(local),
            },
            bytes,
        ))
    }

    pub(super) fn lock_blocking(&self) -> Result<(EtcdLedgerGuard, Option<Vec<u8>>), StoreError> {
        let this = self.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(this.lock().await);
        });
        rx.recv()
            .map_err(|_| etcd_err(&self.ctx.s, "the etcd client runtime stopped"))?
    }
}

impl EtcdLedger {
    /// Host claims on etcd (`<prefix>/claims`: wave → hosts), changed
    /// under the pool ledger's mutex: `claim` adds `hosts` for this wave
    /// (refused, naming the other wave, when an active wave of the prefix
    /// holds one of them; the claims of ended waves are dropped), `None`
    /// releases this wave's claim.
    pub(super) fn claims(&self, hosts: Option<BTreeSet<String>>) -> Result<(), StoreError> {
        let (guard, _) = self.lock_blocking()?;
        let prefix = self.ctx.s.prefix.clone();
        let key = format!("{prefix}/claims");
        let (ctx, wave, lock_key) = (self.ctx.clone(), self.wave.clone(), guard.lock_key.clone());
        let r = block_in(
            &self.handle,
            &self.lost,
            &self.wave,
            &self.ctx.s,
            move || {
                let Ctx { mut c, s, fence } = ctx.clone();
                let (key, prefix, wave, lock_key, hosts) = (
                    key.clone(),
                    prefix.clone(),
                    wave.clone(),
                    lock_key.clone(),
                    hosts.clone(),
                );
                async move {
                    let got = c
                        .get(key.clone(), None)
                        .await
                        .map_err(|e| etcd_err(&s, e))?;
                    let mut claims: BTreeMap<String, BTreeSet<String>> = match got.kvs().first() {
                        Some(kv) => {
                            serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                                path: key.clone().into(),
                                key: "active wave hosts".into(),
                                reason: e.to_string(),
                            })?
                        }
                        None => BTreeMap::new(),
                    };
                    let mut ended = Vec::new();
                    for other in claims.keys().filter(|w| **w != wave) {
                        let st = c
                            .get(format!("{}/status", wave_base(&prefix, other)), None)
                            .await
                            .map_err(|e| etcd_err(&s, e))?;
                        let phase = st
                            .kvs()
                            .first()
                            .map(|kv| super::phase_of(kv.value()))
                            .unwrap_or_default();
                        if phase == "completed" || phase == "aborted" {
                            ended.push(other.clone());
                        }
                    }
                    for w in ended {
                        claims.remove(&w);
                    }
                    match hosts {
                        Some(mine) => {
                            for (other, theirs) in &claims {
                                if *other == wave {
                                    continue;
                                }
                                let shared: Vec<&str> =
                                    mine.intersection(theirs).map(String::as_str).collect();
                                if !shared.is_empty() {
                                    return Ok(Err(StoreError::HostsInOtherWave {
                                        wave: wave.clone(),
                                        other: other.clone(),
                                        hosts: shared.join(", "),
                                    }));
                                }
                            }
                            claims.insert(wave.clone(), mine);
                        }
                        None => {
                            claims.remove(&wave);
                        }
                    }
                    let bytes = serde_json::to_vec(&claims).map_err(|e| StoreError::Corrupt {
                        path: key.clone().into(),
                        key: "active wave hosts".into(),
                        reason: e.to_string(),
                    })?;
                    let txn = Txn::new()
                        .when([fence, Compare::version(lock_key, CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(key, bytes, None)]);
                    if c.txn(txn).await.map_err(|e| etcd_err(&s, e))?.succeeded() {
                        Ok(Ok(()))
                    } else {
                        Ok(Err(StoreError::LostLock {
                        wave,
                        reason: "the wave lock or the pool ledger mutex is no longer this coordinator's".into(),
                    }))
                    }
                }
            },
        );
        drop(guard);
        r?
    }
}

impl EtcdLedgerGuard {
    /// Write the ledger: fenced by the wave's lock and by this mutex key.
    pub(super) fn set(&self, bytes: Vec<u8>) -> Result<(), StoreError> {
        let l = &self.ledger;
        let (ctx, key, lock_key) = (l.ctx.clone(), l.key.clone(), self.lock_key.clone());
        let ok = block_in(&l.handle, &l.lost, &l.wave, &l.ctx.s, move || {
            let Ctx { mut c, s, fence } = ctx.clone();
            let (key, lock_key, bytes) = (key.clone(), lock_key.clone(), bytes.clone());
            async move {
                let txn = Txn::new()
                    .when([fence, Compare::version(lock_key, CompareOp::Greater, 0)])
                    .and_then([TxnOp::put(key, bytes, None)]);
                Ok(c.txn(txn).await.map_err(|e| etcd_err(&s, e))?.succeeded())
            }
        })?;
        if ok {
            Ok(())
        } else {
            l.lost.store(true, Ordering::SeqCst);
            Err(StoreError::LostLock {
                wave: l.wave.clone(),
                reason: "the wave lock or the pool ledger mutex is no longer this coordinator's"
                    .into(),
            })
        }
    }
}

/// What one request needs, owned, so that each try has its own copy.
#[derive(Clone)]
struct Ctx {
    c: Client,
    s: StoreSettings,
    /// The fence of the store's writes.
    fence: Compare,
}

/// How long a request is retried while etcd is unavailable (a leader
/// election, a member down) unless the lock is lost first.
const UNAVAILABLE_RETRY_FOR: Duration = Duration::from_secs(30);

/// Try `f` until it succeeds or fails for a reason other than etcd being
/// unreachable, backing off from 20 ms to 500 ms; give up once the lock is
/// lost (the keepalive saw no success for a whole lease TTL) or after
/// [`UNAVAILABLE_RETRY_FOR`]. Meanwhile the caller waits: nothing is
/// dispatched without its durable write-ahead. Every request here is safe
/// to repeat (a put writes the same bytes; a sequence number or event
/// index that was taken by a try whose answer was lost is skipped, never
/// reused).
async fn retrying<T, F, Fut>(lost: &AtomicBool, wave: &str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match f().await {
            // The lease lapsed while etcd was out of reach (or this process
            // was frozen): whatever the request met, the lock is gone.
            Err(StoreError::Etcd { reason, .. }) if lost.load(Ordering::SeqCst) => {
                return Err(StoreError::LostLock {
                    wave: wave.to_string(),
                    reason: format!("the lock's lease expired; last etcd error: {reason}"),
                });
            }
            Err(StoreError::Etcd { endpoints, reason })
                if start.elapsed() < UNAVAILABLE_RETRY_FOR =>
            {
                tracing::warn!(%endpoints, %reason, "etcd unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// A fenced put; `false` when the fence failed.
async fn fenced_put(ctx: Ctx, key: String, bytes: Vec<u8>) -> Result<bool, StoreError> {
    let Ctx { mut c, s, fence } = ctx;
    let txn = Txn::new()
        .when([fence])
        .and_then([TxnOp::put(key, bytes, None)]);
    let r = c.txn(txn).await.map_err(|e| etcd_err(&s, e))?;
    Ok(r.succeeded())
}

/// Reserve the next sequence number at `key` (`seq/<host>`) in a fenced
/// compare-and-swap; `None` when the fence failed.
async fn next_sequence(ctx: Ctx, key: String, floor: u64) -> Result<Option<u64>, StoreError> {
    let Ctx { mut c, s, fence } = ctx;
    loop {
        let r = c
            .get(key.clone(), None)
            .await
            .map_err(|e| etcd_err(&s, e))?;
        let (cur, rev) = match r.kvs().first() {
            Some(kv) => {
                let cur = kv
                    .value_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        path: key.clone().into(),
                        key: key.clone(),
                        reason: "not a sequence number".into(),
                    })?;
                (cur, kv.mod_revision())
            }
            None => (0, 0),
        };
        let next = cur.max(floor).saturating_add(1);
        let txn = Txn::new()
            .when([
                fence.clone(),
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            ])
            .and_then([TxnOp::put(key.clone(), next.to_string(), None)]);
        let r = c.txn(txn).await.map_err(|e| etcd_err(&s, e))?;
        if r.succeeded() {
            return Ok(Some(next));
        }
        // Either the fence failed (lost) or the counter moved
        // meanwhile (another task of ours): tell them apart.
        let fenced = Txn::new().when([fence.clone()]);
        if !c
            .txn(fenced)
            .await
            .map_err(|e| etcd_err(&s, e))?
            .succeeded()
        {
            return Ok(None);
        }
    }
}

/// Every key under `prefix`, in key order, read in pages of [`PAGE`].
async fn range(
    mut c: Client,
    s: StoreSettings,
    prefix: String,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.clone().into_bytes();
    let mut out = Vec::new();
    loop {
        let r = c
            .get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)),
            )
            .await
            .map_err(|e| etcd_err(&s, e))?;
        for kv in r.kvs() {
            out.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        match r.kvs().last() {
            Some(kv) if r.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// The end of the key range of everything starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `wave halt` on etcd: put the wave's halt key (any machine, no lock).
pub(super) fn request_halt(s: &StoreSettings, wave: &str, text: &str) -> Result<(), StoreError> {
    let key = format!("{}/halt", wave_base(&s.prefix, wave));
    let index = format!("{}/index/{wave}", s.prefix);
    let text = text.to_string();
    let wave = wave.to_string();
    let st = s.clone();
    let prefix = s.prefix.clone();
    one_shot(s, move |mut c| async move {
        let known = c
            .get(index, None)
            .await
            .map_err(|e| etcd_err(&st, e))?
            .count()
            > 0;
        if !known {
            return Err(StoreError::NoSuchWave {
                wave,
                dir: format!("etcd {}", prefix).into(),
            });
        }
        c.put(key, text, None).await.map_err(|e| etcd_err(&st, e))?;
        Ok(())
    })
}

/// `wave status` on etcd: the wave's status key; a wave without one is
/// reported as no such wave.
pub(super) fn read_status(s: &StoreSettings, wave: &str) -> Result<String, StoreError> {
    let key = format!("{}/status", wave_base(&s.prefix, wave));
    let st = s.clone();
    let wave = wave.to_string();
    one_shot(s, move |mut c| async move {
        let r = c.get(key, None).await.map_err(|e| etcd_err(&st, e))?;
        match r.kvs().first() {
            Some(kv) => Ok(String::from_utf8_lossy(kv.value()).into_owned()),
            None => Err(StoreError::NoSuchWave {
                wave,
                dir: format!("etcd {}", st.prefix).into(),
            }),
        }
    })
}

/// `wave list` on etcd: every wave under the prefix with its phase and holder.
pub(super) fn list_waves(s: &StoreSettings) -> Result<Vec<WaveListing>, StoreError> {
    let st = s.clone();
    one_shot(s, move |c| async move {
        let index = format!("{}/index/", st.prefix);
        let waves = range(c.clone(), st.clone(), index.clone()).await?;
        let mut out = Vec::new();
        for (k, _) in waves {
            let wave = k[index.len()..].to_string();
            let base = wave_base(&st.prefix, &wave);
            let mut c = c.clone();
            let status = c
                .get(format!("{base}/status"), None)
                .await
                .map_err(|e| etcd_err(&st, e))?;
            let lock = c
                .get(format!("{base}/lock"), None)
                .await
                .map_err(|e| etcd_err(&st, e))?;
            out.push(WaveListing {
                wave,
                phase: status
                    .kvs()
                    .first()
                    .map_or_else(|| "unknown".into(), |kv| super::phase_of(kv.value())),
                holder: lock
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            });
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::{died_here, prefix_end};

    #[test]
    fn a_holder_is_dead_only_when_its_pid_is_gone_on_this_machine() {
        let here = nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let me = std::process::id();
        assert!(!died_here(&format!("pid {me} on {here} since 1")));
        assert!(died_here(&format!("pid {} on {here} since 1", i32::MAX)));
        assert!(!died_here(&format!(
            "pid {} on not-{here} since 1",
            i32::MAX
        )));
        assert!(!died_here("unknown holder"));
    }

    #[test]
    fn the_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/r/waves/"), b"/r/waves0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
