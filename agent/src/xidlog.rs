//! XID events survive an agent restart but not a reboot: they are kept in a
//! small JSON file under the state dir together with the boot id they were
//! seen in, and events of any other boot are dropped when the file is loaded.

use std::io::Write;
use std::path::{Path, PathBuf};

use ringfence::pb;
use serde::{Deserialize, Serialize};

use crate::gpu::XidHit;

/// File name of the log under the state dir.
pub const FILE_NAME: &str = "xid-events.json";

/// XID log errors.
#[derive(Debug, thiserror::Error)]
pub enum XidLogError {
    /// "cannot read XID log {path}: {source}"
    #[error("cannot read XID log {path}: {source}")]
    Read {
        /// The XID log file ([`FILE_NAME`] under the state directory).
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// "cannot write XID log {path}: {source}"
    #[error("cannot write XID log {path}: {source}")]
    Write {
        /// The XID log file ([`FILE_NAME`] under the state directory).
        path: PathBuf,
        /// The write error.
        source: std::io::Error,
    },
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredXid {
    /// Index of the GPU as NVML enumerates it.
    pub gpu_index: u32,
    /// The GPU's UUID, which identifies it if the indices change.
    pub gpu_uuid: String,
    /// The XID number.
    pub xid: u64,
    /// When the agent recorded it, ms since the Unix epoch.
    pub at_unix_ms: i64,
    /// The boot it happened in; events of earlier boots are dropped on open.
    pub boot_id: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileFormat {
    events: Vec<StoredXid>,
}

/// The XID events of the current boot.
#[derive(Debug)]
pub struct XidLog {
    path: PathBuf,
    boot_id: String,
    events: Vec<StoredXid>,
}

impl XidLog {
    /// Opens (or starts) the log in `state_dir`, keeping only events of `boot_id`.
    /// A corrupt file is set aside as `<file>.corrupt` rather than blocking start.
    pub fn open(state_dir: &Path, boot_id: &str) -> Result<Self, XidLogError> {
        let path = state_dir.join(FILE_NAME);
        let events = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<FileFormat>(&bytes) {
                Ok(f) => f.events,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "corrupt XID log set aside");
                    let _ = std::fs::rename(&path, path.with_extension("json.corrupt"));
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(XidLogError::Read { path, source }),
        };
        Ok(Self {
            events: events
                .into_iter()
                .filter(|e| e.boot_id == boot_id)
                .collect(),
            path,
            boot_id: boot_id.to_owned(),
        })
    }

    /// Records an event and persists the log before returning.
    pub fn record(&mut self, hit: &XidHit, at_unix_ms: i64) -> Result<(), XidLogError> {
        self.events.push(StoredXid {
            gpu_index: hit.gpu_index,
            gpu_uuid: hit.gpu_uuid.clone(),
            xid: hit.xid,
            at_unix_ms,
            boot_id: self.boot_id.clone(),
        });
        self.save()
    }

    /// All events of this boot.
    pub fn events(&self) -> &[StoredXid] {
        &self.events
    }

    /// Events of one GPU (matched by uuid, or by index when the uuid is unknown).
    pub fn for_gpu(&self, index: u32, uuid: &str) -> Vec<pb::XidEvent> {
        self.events
            .iter()
            .filter(|e| {
                if e.gpu_uuid.is_empty() {
                    e.gpu_index == index
                } else {
                    e.gpu_uuid == uuid
                }
            })
            .map(|e| pb::XidEvent {
                xid: e.xid,
                at_unix_ms: e.at_unix_ms,
                boot_id: e.boot_id.clone(),
            })
            .collect()
    }

    /// Writes the log atomically: temp file, fsync, rename, fsync of the dir.
    fn save(&self) -> Result<(), XidLogError> {
        let err = |source| XidLogError::Write {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&FileFormat {
            events: self.events.clone(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}
