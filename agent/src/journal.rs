//! The agent's durable task journal: `<state_dir>/journal.redb`.
//!
//! Every state change is one redb write transaction, committed with
//! immediate durability (fsync) before the agent acts on it, so that after a
//! crash or reboot the journal says exactly where a task was. It holds the
//! tasks by id, the sequence high-water mark (check 5 of task verification),
//! the host's drain mark, the last validation, per-profile installed
//! versions (for rollback), the record of a patch awaiting a reboot or an
//! agent restart, acknowledged faults, and when the journal was created (a
//! task issued before that is refused: wiping the state does not reopen
//! replay).
//!
//! Tasks are also indexed by sequence (for ListTasks pages), and finished
//! tasks older than the retention are removed by [`Journal::compact`]; the
//! high-water mark and unfinished tasks are never removed.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use ringfence::envelope::ReplayGuard;
use ringfence::pb;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// File name of the journal inside the state dir.
pub const FILE_NAME: &str = "journal.redb";

const TASKS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("tasks");
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
const VERSIONS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("versions");
const ACKS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("acks");
/// (sequence, task id) of every task in TASKS.
const BY_SEQ: TableDefinition<'static, (u64, &str), ()> = TableDefinition::new("tasks_by_sequence");

const HIGH_WATER: &str = "high_water";
const DRAIN: &str = "drain";
const VALIDATION: &str = "last_validation";
const PENDING: &str = "pending";
const CREATED: &str = "created_at";

/// The journal could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// the state directory could not be created
    #[error("{path}: cannot create state directory: {source}")]
    StateDir {
        /// The state directory that could not be created.
        path: PathBuf,
        /// The creation error.
        #[source]
        source: std::io::Error,
    },
    /// the redb store failed (open, transaction, commit)
    #[error("journal {path}: {source}")]
    Store {
        /// The journal file (`journal.redb` under the state directory).
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// a stored record does not decode
    #[error("journal {path}: record `{key}` is corrupt: {reason}")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// The record's key (a task id, or a meta key such as `last_validation`).
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// a task id is already recorded (accept is refused; the caller replays it)
    #[error("task `{task_id}` is already recorded")]
    Duplicate {
        /// The task id recorded before.
        task_id: String,
    },
    /// a new task's sequence is not above the high-water mark
    #[error("task sequence {sequence} is not above the high-water mark {high_water}")]
    Sequence {
        /// The new task's sequence number.
        sequence: u64,
        /// The highest sequence number accepted so far.
        high_water: u64,
    },
}

/// The host is marked draining (out of service): who drained it, when and
/// why. Reported as [`pb::DrainMark`] in GetIdentity and health reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainMark {
    /// The Drain task that set the mark.
    pub task_id: String,
    /// Its wave (empty in marks written before this was recorded).
    #[serde(default)]
    pub wave_id: String,
    /// Trust-file id of the coordinator key that signed it (empty in marks
    /// written before this was recorded).
    #[serde(default)]
    pub signed_by: String,
    /// The reason it gave.
    pub reason: String,
    /// When the mark was set, ms since the Unix epoch (the first drain's
    /// time when the host was already draining).
    pub since_unix_ms: i64,
    /// The host was already marked draining when this task started.
    pub already_draining: bool,
}

impl DrainMark {
    /// The mark as the API reports it.
    pub fn to_pb(&self) -> pb::DrainMark {
        pb::DrainMark {
            task_id: self.task_id.clone(),
            wave_id: self.wave_id.clone(),
            signed_by: self.signed_by.clone(),
            reason: self.reason.clone(),
            since_unix_ms: self.since_unix_ms,
            already_draining: self.already_draining,
        }
    }
}

/// The outcome of the last Validate task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationRecord {
    /// The Validate task.
    pub task_id: String,
    /// The attested verdict (`pb::Verdict` as i32).
    pub verdict: i32,
    /// Whether the validation passed as a whole (HEALTHY, versions matched, smoke test passed).
    pub passed: bool,
    /// Why it did not pass (empty when it did).
    pub reasons: Vec<String>,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: i64,
}

impl ValidationRecord {
    /// The verdict's name, e.g. "VERDICT_HEALTHY".
    pub fn verdict_name(&self) -> &'static str {
        pb::Verdict::try_from(self.verdict)
            .unwrap_or(pb::Verdict::Unspecified)
            .as_str_name()
    }
}

/// Versions of one profile around its last successful patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version before the last patch (a rollback returns to it).
    pub before: String,
    /// Version installed by the last patch.
    pub after: String,
    /// The patch task.
    pub task_id: String,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: i64,
}

/// What a patch waits for across an agent restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingKind {
    /// A reboot: done when the boot id changes.
    Reboot,
    /// An agent restart: done when the agent runs the task's version.
    Restart,
}

/// A patch whose command ran (or is running) and that finishes at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The patch task.
    pub task_id: String,
    /// What it waits for.
    pub kind: PendingKind,
    /// Profile and versions, recorded as installed when it completes.
    pub profile: String,
    /// Version before the patch.
    pub version_before: String,
    /// Version the patch installs.
    pub version_after: String,
    /// Boot id when the wait began.
    pub boot_id: String,
    /// Agent version when the wait began.
    pub agent_version: String,
    /// When the wait began, ms since the Unix epoch.
    pub since_unix_ms: i64,
}

/// An operator's acknowledgement of faults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    /// The AckFaults task.
    pub task_id: String,
    /// Free-text note of who asked (informational only, from the task).
    pub operator: String,
    /// Trust-file ids of the approver keys whose ring approvals authorised
    /// the acknowledgement: the acknowledging operators. Empty when none
    /// was needed (no UNHEALTHY fault, or an unprotected ring).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Why.
    pub reason: String,
    /// Reason codes asked for (empty: all current).
    pub codes: Vec<String>,
    /// GPU index (-1: all).
    pub gpu_index: i32,
    /// Fault ids the health source acknowledged.
    pub fault_ids: Vec<String>,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: i64,
}

/// The journal. Cheap reads; each write is one durable transaction.
#[derive(Debug)]
pub struct Journal {
    db: Database,
    path: PathBuf,
}

/// One write transaction; committed by [`Journal::write`].
pub struct Txn<'a> {
    tx: &'a WriteTransaction,
    path: &'a Path,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Open (or create) `<state_dir>/journal.redb`, creating the state dir.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| store(&path, e))?;
        let journal = Self { db, path };
        // Create the tables so that readers never see "table does not exist".
        journal.write(|t| {
            t.tx.open_table(TASKS).map_err(|e| store(t.path, e))?;
            t.tx.open_table(META).map_err(|e| store(t.path, e))?;
            t.tx.open_table(VERSIONS).map_err(|e| store(t.path, e))?;
            t.tx.open_table(ACKS).map_err(|e| store(t.path, e))?;
            t.index_tasks()
        })?;
        Ok(journal)
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` in one write transaction and commit it durably.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, JournalError>,
    ) -> Result<R, JournalError> {
        let tx = self.db.begin_write().map_err(|e| store(&self.path, e))?;
        let r = {
            let mut t = Txn {
                tx: &tx,
                path: &self.path,
            };
            f(&mut t)?
        };
        tx.commit().map_err(|e| store(&self.path, e))?;
        Ok(r)
    }

    /// Record a newly accepted task and raise the high-water mark, in one
    /// transaction. Refuses a known id or a sequence not above the mark.
    pub fn accept(&self, status: &pb::TaskStatus) -> Result<(), JournalError> {
        self.write(|t| {
            if t.task(&status.task_id)?.is_some() {
                return Err(JournalError::Duplicate {
                    task_id: status.task_id.clone(),
                });
            }
            let high_water = t.high_water()?;
            if status.sequence <= high_water {
                return Err(JournalError::Sequence {
                    sequence: status.sequence,
                    high_water,
                });
            }
            t.put_task(status)?;
            t.set_high_water(status.sequence)
        })
    }

    /// Store a task's new status (its own transaction).
    pub fn update(&self, status: &pb::TaskStatus) -> Result<(), JournalError> {
        self.write(|t| t.put_task(status))
    }

    /// Force everything to disk (every commit already is; this is the
    /// explicit sync at shutdown).
    pub fn sync(&self) -> Result<(), JournalError> {
        self.write(|_| Ok(()))
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let table = tx.open_table(META).map_err(|e| store(&self.path, e))?;
        let v = table.get(key).map_err(|e| store(&self.path, e))?;
        v.map(|v| decode_json(&self.path, key, v.value()))
            .transpose()
    }

    /// A recorded task.
    pub fn task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let table = tx.open_table(TASKS).map_err(|e| store(&self.path, e))?;
        let v = table.get(task_id).map_err(|e| store(&self.path, e))?;
        v.map(|v| decode_task(&self.path, task_id, v.value()))
            .transpose()
    }

    /// Every recorded task, oldest (lowest sequence) first.
    pub fn tasks(&self) -> Result<Vec<pb::TaskStatus>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let table = tx.open_table(TASKS).map_err(|e| store(&self.path, e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| store(&self.path, e))? {
            let (k, v) = entry.map_err(|e| store(&self.path, e))?;
            out.push(decode_task(&self.path, k.value(), v.value())?);
        }
        out.sort_by_key(|s| s.sequence);
        Ok(out)
    }

    /// Record `now_ms` as the journal's creation time unless one is
    /// recorded (a journal from before this record gets the time of this
    /// first open). Returns the recorded time.
    pub fn init_created_at(&self, now_ms: i64) -> Result<i64, JournalError> {
        self.write(|t| match t.get_meta::<i64>(CREATED)? {
            Some(at) => Ok(at),
            None => {
                t.set_meta(CREATED, Some(&now_ms))?;
                Ok(now_ms)
            }
        })
    }

    /// When the journal was created, ms since the Unix epoch (if recorded).
    pub fn created_at(&self) -> Result<Option<i64>, JournalError> {
        self.read_meta(CREATED)
    }

    /// At most `limit` tasks of `wave` (every wave when empty) whose
    /// sequence is above `after`, by sequence, and whether more follow.
    pub fn tasks_page(
        &self,
        wave: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<pb::TaskStatus>, bool), JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let index = tx.open_table(BY_SEQ).map_err(|e| store(&self.path, e))?;
        let tasks = tx.open_table(TASKS).map_err(|e| store(&self.path, e))?;
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok((out, false));
        };
        for entry in index
            .range((from, "")..)
            .map_err(|e| store(&self.path, e))?
        {
            let (k, _) = entry.map_err(|e| store(&self.path, e))?;
            let (_, id) = k.value();
            let Some(v) = tasks.get(id).map_err(|e| store(&self.path, e))? else {
                continue;
            };
            let status = decode_task(&self.path, id, v.value())?;
            if !wave.is_empty() && status.wave_id != wave {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(status);
        }
        Ok((out, false))
    }

    /// Remove finished tasks (SUCCEEDED, FAILED, INTERRUPTED) last changed
    /// before `before_unix_ms`, and acknowledgements older than that. The
    /// high-water mark, every unfinished task and the Drain task the drain
    /// mark names (a Patch checks that it succeeded) stay. Returns the
    /// number of task records removed.
    pub fn compact(&self, before_unix_ms: i64) -> Result<usize, JournalError> {
        self.write(|t| {
            let marked = t.drain_mark()?.map(|m| m.task_id);
            let mut tasks = t.tx.open_table(TASKS).map_err(|e| store(t.path, e))?;
            let mut old = Vec::new();
            for entry in tasks.iter().map_err(|e| store(t.path, e))? {
                let (k, v) = entry.map_err(|e| store(t.path, e))?;
                let s = decode_task(t.path, k.value(), v.value())?;
                let finished = matches!(
                    s.state(),
                    pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Interrupted
                );
                let last = s.updated_at_unix_ms.max(s.accepted_at_unix_ms);
                let marks_drain = marked.as_deref() == Some(k.value());
                if finished && last < before_unix_ms && !marks_drain {
                    old.push((s.sequence, k.value().to_string()));
                }
            }
            let mut index = t.tx.open_table(BY_SEQ).map_err(|e| store(t.path, e))?;
            for (seq, id) in &old {
                tasks.remove(id.as_str()).map_err(|e| store(t.path, e))?;
                index
                    .remove((*seq, id.as_str()))
                    .map_err(|e| store(t.path, e))?;
            }
            let mut acks = t.tx.open_table(ACKS).map_err(|e| store(t.path, e))?;
            let mut old_acks = Vec::new();
            for entry in acks.iter().map_err(|e| store(t.path, e))? {
                let (k, v) = entry.map_err(|e| store(t.path, e))?;
                let key = format!("ack {}", k.value());
                let ack: AckRecord = decode_json(t.path, &key, v.value())?;
                if ack.at_unix_ms < before_unix_ms {
                    old_acks.push(k.value());
                }
            }
            for k in old_acks {
                acks.remove(k).map_err(|e| store(t.path, e))?;
            }
            Ok(old.len())
        })
    }

    /// The highest accepted sequence (0 if none).
    pub fn high_water(&self) -> Result<u64, JournalError> {
        Ok(self.read_meta::<u64>(HIGH_WATER)?.unwrap_or(0))
    }

    /// The drain mark, if the host is draining.
    pub fn drain_mark(&self) -> Result<Option<DrainMark>, JournalError> {
        self.read_meta(DRAIN)
    }

    /// The last validation since the last patch, if any.
    pub fn last_validation(&self) -> Result<Option<ValidationRecord>, JournalError> {
        self.read_meta(VALIDATION)
    }

    /// The patch waiting for a reboot or restart, if any.
    pub fn pending(&self) -> Result<Option<Pending>, JournalError> {
        self.read_meta(PENDING)
    }

    /// Versions around the last successful patch with `profile`.
    pub fn installed(&self, profile: &str) -> Result<Option<VersionRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let table = tx.open_table(VERSIONS).map_err(|e| store(&self.path, e))?;
        let v = table.get(profile).map_err(|e| store(&self.path, e))?;
        v.map(|v| decode_json(&self.path, profile, v.value()))
            .transpose()
    }

    /// Every acknowledgement, oldest first.
    pub fn acks(&self) -> Result<Vec<AckRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| store(&self.path, e))?;
        let table = tx.open_table(ACKS).map_err(|e| store(&self.path, e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| store(&self.path, e))? {
            let (k, v) = entry.map_err(|e| store(&self.path, e))?;
            out.push(decode_json(
                &self.path,
                &format!("ack {}", k.value()),
                v.value(),
            )?);
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// A task as seen inside this transaction.
    pub fn task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, JournalError> {
        let table = self.tx.open_table(TASKS).map_err(|e| store(self.path, e))?;
        let v = table.get(task_id).map_err(|e| store(self.path, e))?;
        v.map(|v| decode_task(self.path, task_id, v.value()))
            .transpose()
    }

    /// Store a task status (and index it by sequence).
    pub fn put_task(&mut self, status: &pb::TaskStatus) -> Result<(), JournalError> {
        let mut table = self.tx.open_table(TASKS).map_err(|e| store(self.path, e))?;
        table
            .insert(status.task_id.as_str(), status.encode_to_vec().as_slice())
            .map_err(|e| store(self.path, e))?;
        let mut index = self
            .tx
            .open_table(BY_SEQ)
            .map_err(|e| store(self.path, e))?;
        index
            .insert((status.sequence, status.task_id.as_str()), ())
            .map_err(|e| store(self.path, e))?;
        Ok(())
    }

    /// Index every task by sequence (journals written before the index existed).
    fn index_tasks(&mut self) -> Result<(), JournalError> {
        let tasks = self.tx.open_table(TASKS).map_err(|e| store(self.path, e))?;
        let mut index = self
            .tx
            .open_table(BY_SEQ)
            .map_err(|e| store(self.path, e))?;
        let indexed = index.len().map_err(|e| store(self.path, e))?;
        let stored = tasks.len().map_err(|e| store(self.path, e))?;
        if indexed == stored {
            return Ok(());
        }
        for entry in tasks.iter().map_err(|e| store(self.path, e))? {
            let (k, v) = entry.map_err(|e| store(self.path, e))?;
            let s = decode_task(self.path, k.value(), v.value())?;
            index
                .insert((s.sequence, k.value()), ())
                .map_err(|e| store(self.path, e))?;
        }
        Ok(())
    }

    /// The high-water mark inside this transaction.
    pub fn high_water(&self) -> Result<u64, JournalError> {
        Ok(self.get_meta::<u64>(HIGH_WATER)?.unwrap_or(0))
    }

    /// Set the high-water mark.
    pub fn set_high_water(&mut self, v: u64) -> Result<(), JournalError> {
        self.set_meta(HIGH_WATER, Some(&v))
    }

    /// The drain mark inside this transaction.
    pub fn drain_mark(&self) -> Result<Option<DrainMark>, JournalError> {
        self.get_meta(DRAIN)
    }

    /// Set or clear the drain mark.
    pub fn set_drain_mark(&mut self, mark: Option<&DrainMark>) -> Result<(), JournalError> {
        self.set_meta(DRAIN, mark)
    }

    /// Set or clear the last validation.
    pub fn set_last_validation(
        &mut self,
        v: Option<&ValidationRecord>,
    ) -> Result<(), JournalError> {
        self.set_meta(VALIDATION, v)
    }

    /// Set or clear the pending reboot/restart record.
    pub fn set_pending(&mut self, p: Option<&Pending>) -> Result<(), JournalError> {
        self.set_meta(PENDING, p)
    }

    /// Record the versions around a successful patch with `profile`.
    pub fn set_installed(&mut self, profile: &str, v: &VersionRecord) -> Result<(), JournalError> {
        let mut table = self
            .tx
            .open_table(VERSIONS)
            .map_err(|e| store(self.path, e))?;
        let bytes = encode_json(v);
        table
            .insert(profile, bytes.as_slice())
            .map_err(|e| store(self.path, e))?;
        Ok(())
    }

    /// Append an acknowledgement.
    pub fn add_ack(&mut self, ack: &AckRecord) -> Result<(), JournalError> {
        let mut table = self.tx.open_table(ACKS).map_err(|e| store(self.path, e))?;
        let next = table
            .last()
            .map_err(|e| store(self.path, e))?
            .map_or(0, |(k, _)| k.value() + 1);
        let bytes = encode_json(ack);
        table
            .insert(next, bytes.as_slice())
            .map_err(|e| store(self.path, e))?;
        Ok(())
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, JournalError> {
        let table = self.tx.open_table(META).map_err(|e| store(self.path, e))?;
        let v = table.get(key).map_err(|e| store(self.path, e))?;
        v.map(|v| decode_json(self.path, key, v.value()))
            .transpose()
    }

    fn set_meta<T: Serialize>(&mut self, key: &str, value: Option<&T>) -> Result<(), JournalError> {
        let mut table = self.tx.open_table(META).map_err(|e| store(self.path, e))?;
        match value {
            Some(v) => {
                let bytes = encode_json(v);
                table
                    .insert(key, bytes.as_slice())
                    .map_err(|e| store(self.path, e))?;
            }
            None => {
                table.remove(key).map_err(|e| store(self.path, e))?;
            }
        }
        Ok(())
    }
}

impl ReplayGuard for Journal {
    fn recorded(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, String> {
        self.task(task_id).map_err(|e| e.to_string())
    }

    fn high_water(&self) -> Result<u64, String> {
        Journal::high_water(self).map_err(|e| e.to_string())
    }

    fn created_at_ms(&self) -> Result<Option<i64>, String> {
        self.created_at().map_err(|e| e.to_string())
    }
}

fn store(path: &Path, e: impl Into<redb::Error>) -> JournalError {
    JournalError::Store {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain records cannot fail; an empty value would be
    // reported as corrupt on read rather than silently accepted.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode_json<T: DeserializeOwned>(
    path: &Path,
    key: &str,
    bytes: &[u8],
) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|e| JournalError::Corrupt {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode_task(path: &Path, key: &str, bytes: &[u8]) -> Result<pb::TaskStatus, JournalError> {
    pb::TaskStatus::decode(bytes).map_err(|e| JournalError::Corrupt {
        path: path.to_path_buf(),
        key: format!("task {key}"),
        reason: e.to_string(),
    })
}
