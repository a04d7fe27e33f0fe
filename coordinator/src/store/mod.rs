//! The coordinator's durable wave state: one redb file per wave under the
//! state dir, written ahead of every step (a task is recorded before it is
//! sent, and its outcome after it is known), so a coordinator killed at any
//! point resumes without patching a host twice or skipping one.
//!
//! Only one coordinator may drive a wave: `<wave>.lock` is held with
//! `flock` and names its holder. Other terminals read `<wave>.status.json`
//! (a snapshot the holder rewrites atomically) and request a halt by
//! creating `<wave>.halt`.
//!
//! Waves under one state dir share `pools.json`, the pool ledger
//! ([`PoolLedger`]): each wave's hosts out of service per pool, so that
//! concurrent waves over one pool never together exceed its reserve.
//! They also share `hosts.json` ([`claim_hosts`]): the hosts of every
//! active wave, so a host belongs to at most one active wave.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use ringfence::time::Clock;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::settings::Store as StoreSettings;

pub mod etcd;
mod redb;

/// The wave store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// the state directory or a state file could not be used
    #[error("{path}: {source}")]
    Io {
        /// The directory or file concerned.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// another coordinator holds this wave
    #[error(
        "wave `{wave}` is held by another coordinator ({holder}); stop it, or wait for it to finish"
    )]
    Held {
        /// The wave id.
        wave: String,
        /// The holder's note from the lock file (pid, host, since when), or "unknown holder".
        holder: String,
    },
    /// the embedded database failed
    #[error("wave store {path}: {reason}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The redb error.
        reason: String,
    },
    /// a stored record does not decode
    #[error("wave store {path}: record `{key}` is corrupt: {reason}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// no state exists for this wave
    #[error("no state for wave `{wave}` under {dir}")]
    NoSuchWave {
        /// The wave id.
        wave: String,
        /// The state directory searched.
        dir: PathBuf,
    },
    /// this coordinator no longer holds the wave's lock (its etcd lease
    /// expired or another coordinator took the wave over): nothing more
    /// is written or dispatched
    #[error(
        "wave `{wave}`: this coordinator lost the wave's lock ({reason}); it stops dispatching — another coordinator may be driving the wave now"
    )]
    LostLock {
        /// The wave id.
        wave: String,
        /// What was seen (lease expired, lock key taken by another holder).
        reason: String,
    },
    /// etcd could not be reached or answered with an error
    #[error("etcd store {endpoints}: {reason}")]
    Etcd {
        /// The configured endpoints, comma-separated.
        endpoints: String,
        /// The client's error.
        reason: String,
    },
    /// hosts of this wave belong to another active wave
    #[error(
        "wave `{wave}` refused before anything was drained: {hosts} already belong to active wave `{other}` (running, halted or awaiting approval); finish it, or `ringfence wave abort --wave {other}`"
    )]
    HostsInOtherWave {
        /// The wave refused.
        wave: String,
        /// The active wave that holds the hosts.
        other: String,
        /// The hosts in question, comma-separated.
        hosts: String,
    },
}

/// Paths of one wave's files.
#[derive(Debug, Clone)]
pub struct WavePaths {
    /// The wave id.
    pub wave: String,
    /// The redb database.
    pub db: PathBuf,
    /// flock'd while a coordinator drives the wave; holds the holder's description.
    pub lock: PathBuf,
    /// Snapshot for `wave status` from other terminals.
    pub status: PathBuf,
    /// Created by `wave halt` to request an emergency stop.
    pub halt: PathBuf,
    /// Evidence packets of this wave.
    pub evidence_dir: PathBuf,
    /// The pool ledger shared by every wave under the state dir.
    pub pools: PathBuf,
    /// flock'd while one coordinator reads or changes the pool ledger.
    pub pools_lock: PathBuf,
    /// The hosts of every active wave under the state dir ([`claim_hosts`]).
    pub hosts: PathBuf,
}

impl WavePaths {
    /// Files of `wave` under `state_dir`.
    pub fn new(state_dir: &Path, wave: &str) -> Self {
        Self {
            wave: wave.to_string(),
            db: state_dir.join(format!("{wave}.redb")),
            lock: state_dir.join(format!("{wave}.lock")),
            status: state_dir.join(format!("{wave}.status.json")),
            halt: state_dir.join(format!("{wave}.halt")),
            evidence_dir: state_dir.join(format!("{wave}.evidence")),
            pools: state_dir.join("pools.json"),
            pools_lock: state_dir.join("pools.lock"),
            hosts: state_dir.join("hosts.json"),
        }
    }
}

/// The two tables of byte records the backends keep.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Table {
    /// Wave-level records (spec, plan, sequencer state, decisions).
    Meta,
    /// One record per host.
    Hosts,
}

/// The engine behind a [`WaveStore`]: byte-level records, sequences,
/// events, status, halt flag and the wave's lock.
#[derive(Debug)]
enum Backend {
    Redb(Box<redb::RedbStore>),
    Etcd(Box<etcd::EtcdStore>),
}

/// An open, exclusively held wave store.
#[derive(Debug)]
pub struct WaveStore {
    backend: Backend,
    /// Paths of this wave's local files (evidence packets, the status
    /// snapshot copy; with redb also the database, lock and halt file).
    pub paths: WavePaths,
}

/// Who holds a wave: pid, host and since when (`clock`'s time).
pub(crate) fn holder_note(clock: &dyn Clock) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "pid {} on {} since {}",
        std::process::id(),
        host,
        clock.now_ms()
    )
}

impl WaveStore {
    /// Open (or create) the redb store of `wave` under `state_dir`, taking
    /// the wave's lock; the lock file names the holder (pid, host) and
    /// `clock`'s time.
    pub fn open(state_dir: &Path, wave: &str, clock: &dyn Clock) -> Result<Self, StoreError> {
        let paths = WavePaths::new(state_dir, wave);
        let backend = Backend::Redb(Box::new(redb::RedbStore::open(state_dir, &paths, clock)?));
        Ok(Self { backend, paths })
    }

    /// Open the store of `wave` in the backend `[store]` names: redb under
    /// `state_dir`, or etcd (the wave's lease-backed lock is taken; local
    /// files such as evidence packets still go under `state_dir`).
    pub fn open_in(
        store: &StoreSettings,
        state_dir: &Path,
        wave: &str,
        clock: &dyn Clock,
    ) -> Result<Self, StoreError> {
        match store.backend {
            crate::settings::Backend::Redb => Self::open(state_dir, wave, clock),
            crate::settings::Backend::Etcd => {
                std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
                    path: state_dir.to_path_buf(),
                    source,
                })?;
                let paths = WavePaths::new(state_dir, wave);
                let backend = Backend::Etcd(Box::new(etcd::EtcdStore::open(
                    store,
                    wave,
                    &holder_note(clock),
                    etcd::DEFAULT_LEASE_TTL_S,
                )?));
                Ok(Self { backend, paths })
            }
        }
    }

    /// Whether state for `wave` exists under `state_dir` (redb).
    pub fn exists(state_dir: &Path, wave: &str) -> bool {
        WavePaths::new(state_dir, wave).db.exists()
    }

    /// Where this store's records live, for error messages.
    fn location(&self) -> PathBuf {
        match &self.backend {
            Backend::Redb(_) => self.paths.db.clone(),
            Backend::Etcd(e) => e.location(),
        }
    }

    fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: self.location(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    fn encode<T: Serialize>(&self, key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
            path: self.location(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    fn put(&self, t: Table, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.put(t, key, bytes),
            Backend::Etcd(e) => e.put(t, key, bytes),
        }
    }

    fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>, StoreError> {
        let bytes = match &self.backend {
            Backend::Redb(r) => r.get(t, key)?,
            Backend::Etcd(e) => e.get(t, key)?,
        };
        bytes.map(|b| self.decode(key, &b)).transpose()
    }

    /// Store a wave-level record (spec, plan, sequencer state, decisions).
    pub fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        let bytes = self.encode(key, v)?;
        self.put(Table::Meta, key, &bytes)
    }

    /// Read a wave-level record.
    pub fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get(Table::Meta, key)
    }

    /// Store one host's record (durable when this returns).
    pub fn put_host<T: Serialize>(&self, host: &str, v: &T) -> Result<(), StoreError> {
        let bytes = self.encode(host, v)?;
        self.put(Table::Hosts, host, &bytes)
    }

    /// Store one host's record through the group commit (durable when this
    /// returns, like [`put_host`](Self::put_host)).
    pub async fn put_host_async<T: Serialize>(&self, host: &str, v: &T) -> Result<(), StoreError> {
        let bytes = self.encode(host, v)?;
        match &self.backend {
            Backend::Redb(r) => r.put_host_async(host, bytes).await,
            Backend::Etcd(e) => e.put_async(Table::Hosts, host, bytes).await,
        }
    }

    /// [`next_sequence`](Self::next_sequence) without blocking the runtime
    /// (redb: through the group commit).
    pub async fn next_sequence_async(&self, host: &str, floor: u64) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.next_sequence_async(host, floor).await,
            Backend::Etcd(e) => e.next_sequence_async(host, floor).await,
        }
    }

    /// Read one host's record.
    pub fn get_host<T: DeserializeOwned>(&self, host: &str) -> Result<Option<T>, StoreError> {
        self.get(Table::Hosts, host)
    }

    /// Every host record, by host id.
    pub fn hosts<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let rows = match &self.backend {
            Backend::Redb(r) => r.hosts()?,
            Backend::Etcd(e) => e.hosts()?,
        };
        rows.into_iter()
            .map(|(k, v)| {
                let rec = self.decode(&k, &v)?;
                Ok((k, rec))
            })
            .collect()
    }

    /// The next task sequence number for `host`: above both what this store
    /// has handed out and `floor` (the agent's reported high-water mark).
    /// Durable before it returns, so numbers only grow. On etcd the
    /// number also carries the lock's fencing token in its high bits
    /// (see [`etcd::fenced_sequence`]), so any task of a later holder is
    /// above every task of an earlier one.
    pub fn next_sequence(&self, host: &str, floor: u64) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.next_sequence(host, floor),
            Backend::Etcd(e) => e.next_sequence(host, floor),
        }
    }

    /// Append an audit event; returns its index.
    pub fn append_event<T: Serialize>(&self, event: &T) -> Result<u64, StoreError> {
        let bytes = self.encode("event", event)?;
        match &self.backend {
            Backend::Redb(r) => r.append_event(&bytes),
            Backend::Etcd(e) => e.append_event(&bytes),
        }
    }

    /// Every audit event, oldest first.
    pub fn events<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let rows = match &self.backend {
            Backend::Redb(r) => r.events()?,
            Backend::Etcd(e) => e.events()?,
        };
        rows.into_iter()
            .map(|(i, v)| self.decode(&format!("event {i}"), &v))
            .collect()
    }

    /// Write the status snapshot other terminals read: the local file
    /// (atomic rename) and, on etcd, the wave's status key as well.
    pub fn write_status<T: Serialize>(&self, status: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(status).map_err(|e| StoreError::Corrupt {
            path: self.paths.status.clone(),
            key: "status".into(),
            reason: e.to_string(),
        })?;
        if let Backend::Etcd(e) = &self.backend {
            e.write_status(&bytes)?;
        }
        write_atomic(&self.paths.status, &bytes)
    }

    /// Whether `wave halt` asked this wave to stop (etcd: the halt key,
    /// followed by a watch, so this is a memory read).
    pub fn halt_requested(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => self.paths.halt.exists(),
            Backend::Etcd(e) => e.halt_requested(),
        }
    }

    /// The halt request as it stands now (`None`: none); see [`halt_request`].
    pub fn halt_request(&self) -> Option<String> {
        match &self.backend {
            Backend::Redb(_) => halt_request(&self.paths),
            Backend::Etcd(e) => e.halt_request().ok().flatten(),
        }
    }

    /// Clear the halt request `seen` and nothing newer; `true` when a newer
    /// one stands (see [`clear_halt`]).
    pub fn clear_halt(&self, seen: Option<&str>) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redb(_) => clear_halt(&self.paths, seen),
            Backend::Etcd(e) => e.clear_halt(seen),
        }
    }

    /// The pool ledger this wave shares with the other waves of its store:
    /// `pools.json` under the state dir (redb), or one etcd key under a
    /// distributed mutex (etcd), so that waves driven from different
    /// machines over one pool stay within its reserve together.
    pub fn ledger(&self) -> PoolLedger {
        match &self.backend {
            Backend::Redb(_) => PoolLedger::new(&self.paths),
            Backend::Etcd(e) => PoolLedger {
                etcd: Some(e.ledger()),
                ..PoolLedger::new(&self.paths)
            },
        }
    }

    /// Claim `hosts` for this wave before it drains anything (see
    /// [`claim_hosts`]); on etcd across every coordinator of the prefix.
    pub fn claim_hosts<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(_) => claim_hosts(&self.paths, hosts),
            Backend::Etcd(e) => e
                .ledger()
                .claims(Some(hosts.into_iter().cloned().collect())),
        }
    }

    /// Release this wave's hosts (an aborted wave; see [`release_hosts`]).
    pub fn release_hosts(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(_) => release_hosts(&self.paths),
            Backend::Etcd(e) => e.ledger().claims(None),
        }
    }

    /// Whether this coordinator still holds the wave (redb: always, the
    /// flock lives as long as the store; etcd: the lease is alive and the
    /// lock key is ours).
    pub fn holds_lock(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => true,
            Backend::Etcd(e) => e.holds_lock(),
        }
    }
}

/// Request a halt of `wave` in the backend `[store]` names (`wave halt`
/// from any machine): redb writes `<wave>.halt` under `state_dir`; etcd
/// puts the wave's halt key, which the driving coordinator watches.
pub fn request_halt_in(
    store: &StoreSettings,
    state_dir: &Path,
    wave: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    match store.backend {
        crate::settings::Backend::Redb => request_halt(&WavePaths::new(state_dir, wave), now_ms),
        crate::settings::Backend::Etcd => etcd::request_halt(store, wave, &halt_text(now_ms)),
    }
}

/// The status snapshot of `wave` in the backend `[store]` names (`wave
/// status` from any machine): redb's `<wave>.status.json`, or etcd's status key.
pub fn read_status_in(
    store: &StoreSettings,
    state_dir: &Path,
    wave: &str,
) -> Result<String, StoreError> {
    match store.backend {
        crate::settings::Backend::Redb => {
            let path = WavePaths::new(state_dir, wave).status;
            std::fs::read_to_string(&path).map_err(|source| StoreError::Io { path, source })
        }
        crate::settings::Backend::Etcd => etcd::read_status(store, wave),
    }
}

/// Every wave in the configured store with its state and holder (`wave list`).
pub fn list_waves_in(
    store: &StoreSettings,
    state_dir: &Path,
) -> Result<Vec<WaveListing>, StoreError> {
    match store.backend {
        crate::settings::Backend::Redb => list_local(state_dir),
        crate::settings::Backend::Etcd => etcd::list_waves(store),
    }
}

/// One wave as `wave list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveListing {
    /// The wave id.
    pub wave: String,
    /// The phase from its status snapshot (`unknown` when none was written yet).
    pub phase: String,
    /// Who drives it now (pid, host, since when), if anyone.
    pub holder: Option<String>,
}

fn phase_of(status: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(status)
        .ok()
        .and_then(|v| v["phase"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The waves under a redb state dir.
fn list_local(state_dir: &Path) -> Result<Vec<WaveListing>, StoreError> {
    let rd = match std::fs::read_dir(state_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: state_dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(wave) = name.strip_suffix(".redb") else {
            continue;
        };
        let paths = WavePaths::new(state_dir, wave);
        let phase = std::fs::read(&paths.status)
            .map(|b| phase_of(&b))
            .unwrap_or_else(|_| "unknown".into());
        let holder = match std::fs::File::open(&paths.lock) {
            Ok(f) => match Flock::lock(f, FlockArg::LockSharedNonblock) {
                Ok(_) => None,
                Err(_) => std::fs::read_to_string(&paths.lock)
                    .ok()
                    .map(|s| s.trim().to_string()),
            },
            Err(_) => None,
        };
        out.push(WaveListing {
            wave: wave.to_string(),
            phase,
            holder,
        });
    }
    out.sort_by(|a, b| a.wave.cmp(&b.wave));
    Ok(out)
}

fn halt_text(now_ms: i64) -> String {
    let mut id = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    format!(
        "halt requested at {now_ms} by pid {} id {}\n",
        std::process::id(),
        hex::encode(id)
    )
}

/// Request a halt of the wave (`wave halt`): writes `<wave>.halt` naming
/// when, by which process, with a unique id, so that a resume can tell a
/// halt it decided over from one requested after it began.
pub fn request_halt(paths: &WavePaths, now_ms: i64) -> Result<(), StoreError> {
    write_atomic(&paths.halt, halt_text(now_ms).as_bytes())
}

/// The halt request of the wave as it stands now (`None`: none).
pub fn halt_request(paths: &WavePaths) -> Option<String> {
    std::fs::read_to_string(&paths.halt).ok()
}

/// Clear the halt request `seen` (what [`halt_request`] returned when the
/// resume began) and nothing newer: the request is taken away by an atomic
/// rename, and if it is not the one seen (a halt requested after the resume
/// began) it is put back and `true` is returned — the resumed wave must halt.
pub fn clear_halt(paths: &WavePaths, seen: Option<&str>) -> Result<bool, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let mut id = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    let mut taken = paths.halt.clone().into_os_string();
    taken.push(format!(".{}.{}.taken", std::process::id(), hex::encode(id)));
    let taken = PathBuf::from(taken);
    match std::fs::rename(&paths.halt, &taken) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&paths.halt)(e)),
    }
    let text = std::fs::read_to_string(&taken).map_err(io(&taken))?;
    let newer = seen != Some(text.as_str());
    if newer {
        // Put it back; a halt written meanwhile stands as well.
        match std::fs::hard_link(&taken, &paths.halt) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&paths.halt)(e)),
        }
    }
    std::fs::remove_file(&taken).map_err(io(&taken))?;
    Ok(newer)
}

/// Hosts out of service per pool, by wave: the ledger every wave under one
/// state dir shares (`pools.json`), so that concurrent waves over the same
/// pool together stay within its reserve. A wave records its hosts out of
/// service (in flight, or failed and left drained) before it starts
/// another, under the ledger lock (`pools.lock`, flock), and reads the other
/// waves' hosts as facts for the sequencer.
///
/// The file is replaced atomically but not fsynced (it changes at every
/// dispatch round): a killed coordinator loses nothing, and after a machine
/// crash a resumed wave rewrites its entry and a new wave's probe sees
/// every host still drained.
#[derive(Debug, Clone)]
pub struct PoolLedger {
    file: PathBuf,
    lock: PathBuf,
    /// On etcd: the ledger key, under the store's distributed mutex.
    etcd: Option<etcd::EtcdLedger>,
}

/// One wave's entry: pool → hosts out of service.
pub type LedgerEntry = BTreeMap<String, BTreeSet<String>>;

/// How often a coordinator waiting for the ledger lock tries again.
const LEDGER_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

impl PoolLedger {
    /// The ledger of the state dir of `paths`.
    pub fn new(paths: &WavePaths) -> Self {
        Self {
            file: paths.pools.clone(),
            lock: paths.pools_lock.clone(),
            etcd: None,
        }
    }

    fn open_lock(&self) -> Result<File, StoreError> {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.lock)
            .map_err(|source| StoreError::Io {
                path: self.lock.clone(),
                source,
            })
    }

    fn guard(&self, lock: Flock<File>) -> Result<LedgerGuard, StoreError> {
        let waves = match std::fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: self.file.clone(),
                key: "pool ledger".into(),
                reason: format!(
                    "{e}; remove the file once no wave under this state dir is running"
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.file.clone(),
                    source,
                });
            }
        };
        Ok(LedgerGuard {
            file: self.file.clone(),
            waves,
            _lock: Some(lock),
            etcd: None,
        })
    }

    /// The etcd ledger, taken: read under the mutex.
    fn etcd_guard(
        e: &etcd::EtcdLedger,
        (guard, waves): (etcd::EtcdLedgerGuard, Option<Vec<u8>>),
    ) -> Result<LedgerGuard, StoreError> {
        let waves = match waves {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|err| StoreError::Corrupt {
                path: e.location(),
                key: "pool ledger".into(),
                reason: err.to_string(),
            })?,
            None => BTreeMap::new(),
        };
        Ok(LedgerGuard {
            file: e.location(),
            waves,
            _lock: None,
            etcd: Some(guard),
        })
    }

    /// Take the ledger (waits, without blocking the runtime, while another
    /// coordinator holds it; every holder keeps it for one short read/write).
    pub async fn lock(&self) -> Result<LedgerGuard, StoreError> {
        if let Some(e) = &self.etcd {
            return Self::etcd_guard(e, e.lock().await?);
        }
        let mut file = self.open_lock()?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return self.guard(l),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    file = f;
                    tokio::time::sleep(LEDGER_RETRY).await;
                }
                Err((_, e)) => {
                    return Err(StoreError::Io {
                        path: self.lock.clone(),
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// [`lock`](Self::lock) for synchronous callers (blocks the thread).
    pub fn lock_blocking(&self) -> Result<LedgerGuard, StoreError> {
        if let Some(e) = &self.etcd {
            return Self::etcd_guard(e, e.lock_blocking()?);
        }
        let file = self.open_lock()?;
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(l) => self.guard(l),
            Err((_, e)) => Err(StoreError::Io {
                path: self.lock.clone(),
                source: e.into(),
            }),
        }
    }
}

/// The pool ledger, held (read when taken).
#[derive(Debug)]
pub struct LedgerGuard {
    file: PathBuf,
    waves: BTreeMap<String, LedgerEntry>,
    _lock: Option<Flock<File>>,
    etcd: Option<etcd::EtcdLedgerGuard>,
}

impl LedgerGuard {
    /// Every other wave's hosts out of service: pool → host → wave.
    pub fn others(&self, wave: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (other, entry) in &self.waves {
            if other == wave {
                continue;
            }
            for (pool, hosts) in entry {
                let p = out.entry(pool.clone()).or_default();
                for h in hosts {
                    p.insert(h.clone(), other.clone());
                }
            }
        }
        out
    }

    /// Replace `wave`'s entry (an empty entry removes it).
    pub fn set(&mut self, wave: &str, entry: &LedgerEntry) -> Result<(), StoreError> {
        let entry: LedgerEntry = entry
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(p, h)| (p.clone(), h.clone()))
            .collect();
        if entry.is_empty() {
            self.waves.remove(wave);
        } else {
            self.waves.insert(wave.to_string(), entry);
        }
        let bytes = serde_json::to_vec_pretty(&self.waves).map_err(|e| StoreError::Corrupt {
            path: self.file.clone(),
            key: wave.to_string(),
            reason: e.to_string(),
        })?;
        match &self.etcd {
            Some(g) => g.set(bytes),
            None => replace_file(&self.file, &bytes, false),
        }
    }
}

/// Every active wave's hosts: wave → hosts (`hosts.json`).
type HostClaims = BTreeMap<String, BTreeSet<String>>;

fn read_claims(paths: &WavePaths) -> Result<HostClaims, StoreError> {
    match std::fs::read(&paths.hosts) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: paths.hosts.clone(),
            key: "active wave hosts".into(),
            reason: format!("{e}; remove the file once no wave under this state dir is running"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(StoreError::Io {
            path: paths.hosts.clone(),
            source,
        }),
    }
}

fn write_claims(paths: &WavePaths, claims: &HostClaims) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(claims).map_err(|e| StoreError::Corrupt {
        path: paths.hosts.clone(),
        key: "active wave hosts".into(),
        reason: e.to_string(),
    })?;
    write_atomic(&paths.hosts, &bytes)
}

/// Whether wave `other` under the same state dir has ended: its status
/// snapshot says completed or aborted, or no state of it is left.
fn ended(paths: &WavePaths, other: &str) -> bool {
    let dir = paths.db.parent().unwrap_or(Path::new("."));
    let o = WavePaths::new(dir, other);
    if !o.db.exists() {
        return true;
    }
    std::fs::read(&o.status)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["phase"] == "completed" || v["phase"] == "aborted")
}

/// Claim `hosts` for the wave of `paths` before it drains anything: a host
/// belongs to at most one active (running, halted or awaiting approval)
/// wave under a state dir. Refused, naming the other wave, when one of the
/// hosts is claimed by another wave that has not ended (completed, or
/// aborted: [`release_hosts`]); the claims of ended waves are dropped.
/// Taken under the pool ledger's lock (`pools.lock`).
pub fn claim_hosts<'a>(
    paths: &WavePaths,
    hosts: impl IntoIterator<Item = &'a String>,
) -> Result<(), StoreError> {
    let _lock = PoolLedger::new(paths).lock_blocking()?;
    let mut claims = read_claims(paths)?;
    claims.retain(|w, _| w == &paths.wave || !ended(paths, w));
    let mine: BTreeSet<String> = hosts.into_iter().cloned().collect();
    for (other, theirs) in &claims {
        if other == &paths.wave {
            continue;
        }
        let shared: Vec<&str> = mine.intersection(theirs).map(String::as_str).collect();
        if !shared.is_empty() {
            return Err(StoreError::HostsInOtherWave {
                wave: paths.wave.clone(),
                other: other.clone(),
                hosts: shared.join(", "),
            });
        }
    }
    claims.insert(paths.wave.clone(), mine);
    write_claims(paths, &claims)
}

/// Release the hosts of the wave of `paths` (an aborted wave).
pub fn release_hosts(paths: &WavePaths) -> Result<(), StoreError> {
    let _lock = PoolLedger::new(paths).lock_blocking()?;
    let mut claims = read_claims(paths)?;
    if claims.remove(&paths.wave).is_some() {
        write_claims(paths, &claims)?;
    }
    Ok(())
}

/// Write a file atomically: the bytes go to a uniquely named temporary
/// sibling (created exclusively, so a stale or planted `*.tmp` file or link
/// is never followed and two writers never share one), which is synced,
/// given the target's permissions (0644 for a new file) and renamed over
/// `path`; then the directory is synced so the rename survives a crash.
/// Every file the coordinator replaces goes through here.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    replace_file(path, bytes, true)
}

/// [`write_atomic`]; `sync: false` skips both fsyncs (for the pool ledger,
/// rewritten at every dispatch round; see [`PoolLedger`]).
fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    if sync {
        tmp.as_file().sync_all().map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    if sync {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    // Reopen, sequences, concurrent writes and the second holder are tested
    // once for both backends: `coordinator/tests/it/store_backends.rs`.

    #[test]
    fn atomic_write_never_follows_a_planted_temp_file_and_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("w.status.json");
        // Where a fixed temp name would be: a link to someone else's file.
        std::os::unix::fs::symlink(&victim, dir.path().join("w.status.tmp")).unwrap();
        write_atomic(&target, b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n != "w.status.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn concurrent_atomic_writes_of_one_file_all_succeed_and_never_mix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = Arc::new(dir.path().join("w.status.json"));
        std::fs::write(&*target, b"old").unwrap();
        std::fs::set_permissions(&*target, std::fs::Permissions::from_mode(0o640)).unwrap();
        let writers: Vec<_> = (0..8u8)
            .map(|w| {
                let target = target.clone();
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        write_atomic(&target, &[w; 4096]).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let bytes = std::fs::read(&*target).unwrap();
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|b| *b == bytes[0]), "mixed writes");
        let mode = std::fs::metadata(&*target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "the file keeps its mode");
    }

    #[test]
    fn a_resume_clears_only_the_halt_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let paths = WavePaths::new(dir.path(), "w");
        // Nothing to clear.
        assert!(!clear_halt(&paths, None).unwrap());
        request_halt(&paths, 1).unwrap();
        let seen = halt_request(&paths);
        assert!(seen.is_some());
        assert!(!clear_halt(&paths, seen.as_deref()).unwrap());
        assert!(!paths.halt.exists(), "the halt decided over is cleared");
        // A halt requested after the resume began (even at the same
        // millisecond) stands.
        request_halt(&paths, 2).unwrap();
        let seen = halt_request(&paths);
        request_halt(&paths, 2).unwrap();
        assert!(clear_halt(&paths, seen.as_deref()).unwrap());
        assert!(paths.halt.exists());
        // So does one when none was seen.
        assert!(clear_halt(&paths, None).unwrap());
        assert!(paths.halt.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("taken"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn the_pool_ledger_shows_each_wave_the_others_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let a = PoolLedger::new(&WavePaths::new(dir.path(), "a"));
        let b = PoolLedger::new(&WavePaths::new(dir.path(), "b"));
        let entry = |pool: &str, hosts: &[&str]| -> LedgerEntry {
            let mut e = LedgerEntry::new();
            e.insert(
                pool.to_string(),
                hosts.iter().map(|h| (*h).to_string()).collect(),
            );
            e
        };
        {
            let mut g = a.lock().await.unwrap();
            assert!(g.others("a").is_empty());
            g.set("a", &entry("p", &["h1", "h2"])).unwrap();
            // Held: another coordinator waits.
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(50), b.lock())
                    .await
                    .is_err()
            );
        }
        let mut g = b.lock().await.unwrap();
        let others = g.others("b");
        assert_eq!(others["p"].len(), 2);
        assert_eq!(others["p"]["h1"], "a");
        assert!(g.others("a").is_empty(), "its own entry is not another's");
        g.set("b", &entry("p", &["h3"])).unwrap();
        g.set("a", &LedgerEntry::new()).unwrap();
        drop(g);
        let g = a.lock_blocking().unwrap();
        let others = g.others("a");
        assert_eq!(others["p"].keys().collect::<Vec<_>>(), ["h3"]);
        drop(g);
        // A damaged ledger stops dispatch with a clear error, never reads as empty.
        std::fs::write(dir.path().join("pools.json"), b"{\"a\": [").unwrap();
        let err = a.lock().await.unwrap_err().to_string();
        assert!(
            err.contains("pools.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
