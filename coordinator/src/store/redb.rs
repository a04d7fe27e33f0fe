//! The embedded backend (the default): one redb file per wave under the
//! state dir, held with `flock` on `<wave>.lock`, which names the holder.
//! Host records and sequence numbers go through a group commit so that
//! thousands of host runs share a handful of fsyncs.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, mpsc};

use nix::fcntl::{Flock, FlockArg};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ringfence::time::Clock;

use super::{StoreError, Table, WavePaths};

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const HOSTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("hosts");
const SEQ: TableDefinition<'_, &str, u64> = TableDefinition::new("sequence");
const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");

fn table(t: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match t {
        Table::Meta => META,
        Table::Hosts => HOSTS,
    }
}

/// An open, exclusively held redb wave store.
#[derive(Debug)]
pub(super) struct RedbStore {
    db: Arc<Database>,
    paths: WavePaths,
    committer: Option<Committer>,
    _lock: Flock<File>,
}

/// A write host runs wait for: durable when its reply comes.
#[derive(Debug)]
enum GroupOp {
    /// Store a host record.
    Host { key: String, bytes: Vec<u8> },
    /// Hand out the next sequence number of a host.
    Sequence { host: String, floor: u64 },
}

#[derive(Debug)]
struct Pending {
    op: GroupOp,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Group commit: one thread takes every write queued while the previous
/// commit was syncing and commits them in one redb transaction, so thousands
/// of host runs share a handful of fsyncs instead of one each. Every writer
/// still waits until its write is durable.
#[derive(Debug)]
struct Committer {
    queue: mpsc::Sender<Pending>,
    thread: std::thread::JoinHandle<()>,
}

/// Most writes in one group commit.
const MAX_GROUP: usize = 4096;

impl Committer {
    fn start(db: Arc<Database>) -> Self {
        let (queue, rx) = mpsc::channel::<Pending>();
        let thread = std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(p) => group.push(p),
                        Err(_) => break,
                    }
                }
                match commit_group(&db, &group) {
                    Ok(results) => {
                        for (p, r) in group.into_iter().zip(results) {
                            let _ = p.done.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        for p in group {
                            let _ = p.done.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { queue, thread }
    }
}

/// Apply `group` in order in one write transaction; per op, the sequence
/// number handed out (0 for host records).
fn commit_group(db: &Database, group: &[Pending]) -> Result<Vec<u64>, String> {
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(group.len());
    {
        let mut hosts = tx.open_table(HOSTS).map_err(|e| e.to_string())?;
        let mut seq = tx.open_table(SEQ).map_err(|e| e.to_string())?;
        for p in group {
            match &p.op {
                GroupOp::Host { key, bytes } => {
                    hosts
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                    out.push(0);
                }
                GroupOp::Sequence { host, floor } => {
                    out.push(bump_sequence(&mut seq, host, *floor).map_err(|e| e.to_string())?);
                }
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    Ok(out)
}

/// The next sequence number of `host`: above every one handed out and
/// above `floor`; stored before it is returned.
fn bump_sequence(
    t: &mut redb::Table<'_, &str, u64>,
    host: &str,
    floor: u64,
) -> Result<u64, redb::StorageError> {
    let cur = t.get(host)?.map(|v| v.value()).unwrap_or(0);
    let next = cur.max(floor).saturating_add(1);
    t.insert(host, next)?;
    Ok(next)
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue ends the committer once it has committed what
        // is queued; wait for it so the database closes after the last write.
        if let Some(c) = self.committer.take() {
            drop(c.queue);
            let _ = c.thread.join();
        }
    }
}

impl RedbStore {
    /// Open (or create) the store of `paths`, taking the wave's lock; the
    /// lock file names the holder (pid, host) and `clock`'s time.
    pub(super) fn open(
        state_dir: &Path,
        paths: &WavePaths,
        clock: &dyn Clock,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&paths.lock)
            .map_err(io(&paths.lock))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, _)) => {
                let holder = std::fs::read_to_string(&paths.lock)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                return Err(StoreError::Held {
                    wave: paths.wave.clone(),
                    holder: if holder.is_empty() {
                        "unknown holder".into()
                    } else {
                        holder
                    },
                });
            }
        };
        lock.set_len(0).map_err(io(&paths.lock))?;
        write!(&mut *lock, "{}", super::holder_note(clock)).map_err(io(&paths.lock))?;
        lock.sync_all().map_err(io(&paths.lock))?;
        let db = Database::create(&paths.db).map_err(|e| StoreError::Db {
            path: paths.db.clone(),
            reason: e.to_string(),
        })?;
        let db = Arc::new(db);
        let store = Self {
            committer: Some(Committer::start(db.clone())),
            db,
            paths: paths.clone(),
            _lock: lock,
        };
        store.init_tables()?;
        Ok(store)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.paths.db.clone(),
            reason: e.to_string(),
        }
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            tx.open_table(META).map_err(|e| self.db_err(e))?;
            tx.open_table(HOSTS).map_err(|e| self.db_err(e))?;
            tx.open_table(SEQ).map_err(|e| self.db_err(e))?;
            tx.open_table(EVENTS).map_err(|e| self.db_err(e))?;
        }
        tx.commit().map_err(|e| self.db_err(e))
    }

    pub(super) fn put(&self, t: Table, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut t = tx.open_table(table(t)).map_err(|e| self.db_err(e))?;
            t.insert(key, bytes).map_err(|e| self.db_err(e))?;
        }
        tx.commit().map_err(|e| self.db_err(e))
    }

    pub(super) fn get(&self, t: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = tx.open_table(table(t)).map_err(|e| self.db_err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.value().to_vec()))
    }

    pub(super) async fn put_host_async(
        &self,
        host: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.grouped(GroupOp::Host {
            key: host.to_string(),
            bytes,
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn next_sequence_async(
        &self,
        host: &str,
        floor: u64,
    ) -> Result<u64, StoreError> {
        self.grouped(GroupOp::Sequence {
            host: host.to_string(),
            floor,
        })
        .await
    }

    async fn grouped(&self, op: GroupOp) -> Result<u64, StoreError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = self
            .committer
            .as_ref()
            .is_some_and(|c| c.queue.send(Pending { op, done }).is_ok());
        if !sent {
            return Err(self.db_err("the group commit thread has stopped"));
        }
        match wait.await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(self.db_err(e)),
            Err(_) => Err(self.db_err("the group commit thread stopped before committing")),
        }
    }

    pub(super) fn hosts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = tx.open_table(HOSTS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub(super) fn next_sequence(&self, host: &str, floor: u64) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let next;
        {
            let mut t = tx.open_table(SEQ).map_err(|e| self.db_err(e))?;
            next = bump_sequence(&mut t, host, floor).map_err(|e| self.db_err(e))?;
        }
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(next)
    }

    pub(super) fn append_event(&self, bytes: &[u8]) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let idx;
        {
            let mut t = tx.open_table(EVENTS).map_err(|e| self.db_err(e))?;
            idx = t
                .last()
                .map_err(|e| self.db_err(e))?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(0);
            t.insert(idx, bytes).map_err(|e| self.db_err(e))?;
        }
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(idx)
    }

    pub(super) fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = tx.open_table(EVENTS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }
}
