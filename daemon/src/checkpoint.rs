//! The checkpoint store: what each connector has durably handed on, in RocksDB.
//!
//! Positions only ever move forward: a write of a lower LSN than the stored one is ignored, so
//! a late or replayed acknowledgement can never move a source back.
//!
//! A failed call (a state directory that is full or not writable) closes the store, and the
//! next call opens it again: RocksDB stays read-only after a failed write until it is reopened,
//! and the daemon is to recover by itself once the directory is fixed. Nothing is confirmed to
//! PostgreSQL or Kafka meanwhile, since a position counts only once it is stored.

use bitclone9_core::{Lsn, TableId};
use bitclone9_postgres_source::{ResumeState, TableShape};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open the checkpoint store at {dir}: {detail}")]
    Open { dir: PathBuf, detail: String },
    #[error("checkpoint store: {0}")]
    Io(#[from] rocksdb::Error),
    #[error("the checkpoint store in the state directory {dir} failed: {detail}; check that the directory is writable and has free space (the store is opened again on the next attempt)")]
    Failed { dir: PathBuf, detail: String },
    #[error("checkpoint store: corrupt value under {0}")]
    Corrupt(String),
}

pub struct CheckpointStore {
    /// `None` after a failed call, until the next call opens it again (primary stores only).
    db: RwLock<Option<rocksdb::DB>>,
    /// The state directory.
    dir: PathBuf,
    /// The scratch folder of a secondary instance (a view of a store a daemon holds). Declared
    /// after `db`, so it is removed only once the database is closed.
    _secondary: Option<Scratch>,
}

/// A folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lsn_key(source: &str) -> String {
    format!("source/{source}/lsn")
}
fn snapshot_key(source: &str) -> String {
    format!("source/{source}/snapshot_done")
}
fn resync_prefix(source: &str) -> String {
    format!("source/{source}/resync/")
}
fn resync_key(source: &str, table: &TableId) -> Vec<u8> {
    table_key(resync_prefix(source), table)
}
fn shape_prefix(source: &str) -> String {
    format!("source/{source}/shape/")
}
fn shape_key(source: &str, table: &TableId) -> Vec<u8> {
    table_key(shape_prefix(source), table)
}
fn drop_prefix(source: &str) -> String {
    format!("source/{source}/drop/")
}
fn drop_key(source: &str, table: &TableId) -> Vec<u8> {
    table_key(drop_prefix(source), table)
}
fn table_key(prefix: String, table: &TableId) -> Vec<u8> {
    let mut key = prefix.into_bytes();
    // JSON keeps any schema or table name apart, dots and slashes included.
    key.extend(
        serde_json::json!([table.schema, table.name])
            .to_string()
            .into_bytes(),
    );
    key
}

/// A table's shape as stored: `{"lsn": 123, "attnums": [1, 2, 4], "relation_id": 16384}`
/// (without `relation_id` when stored by an older BitClone9).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredShape {
    lsn: u64,
    attnums: Vec<i16>,
    #[serde(default)]
    relation_id: u32,
}

/// Size of one RocksDB memtable of the checkpoint store.
const MEMTABLE_BYTES: usize = 2 << 20;

impl CheckpointStore {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let open_err = |detail: String| CheckpointError::Open {
            dir: dir.to_path_buf(),
            detail,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            db: RwLock::new(Some(Self::open_primary(dir)?)),
            dir: dir.to_path_buf(),
            _secondary: None,
        })
    }

    fn open_primary(dir: &Path) -> Result<rocksdb::DB, CheckpointError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(3);
        // A few hundred small keys, each written over and over: 2 MB memtables (RocksDB's
        // default is 64 MB each) flush often and keep the store's memory flat.
        opts.set_write_buffer_size(MEMTABLE_BYTES);
        opts.set_max_write_buffer_number(2);
        rocksdb::DB::open(&opts, dir.join("checkpoints")).map_err(|e| {
            let msg = e.to_string();
            CheckpointError::Open {
                dir: dir.to_path_buf(),
                detail: if msg.contains("lock") {
                    format!("{msg} (is another bitclone9 running with this state_dir?)")
                } else {
                    msg
                },
            }
        })
    }

    /// Runs `f` on the open database, opening it again first if an earlier call failed. A
    /// failure of `f` closes a primary store (see the module doc).
    fn with_db<T>(
        &self,
        f: impl FnOnce(&rocksdb::DB) -> Result<T, CheckpointError>,
    ) -> Result<T, CheckpointError> {
        let closed = self.db.read().unwrap_or_else(|p| p.into_inner()).is_none();
        if closed {
            let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
            if db.is_none() {
                *db = Some(Self::open_primary(&self.dir)?);
                tracing::info!(dir = %self.dir.display(), "checkpoint store opened again after a failure");
            }
        }
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_ref() else {
            return Err(CheckpointError::Failed {
                dir: self.dir.clone(),
                detail: "closed after a failure".into(),
            });
        };
        match f(db) {
            Err(CheckpointError::Io(e)) if self._secondary.is_none() => {
                drop(guard);
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::error!(dir = %self.dir.display(), error = %e, "checkpoint store failed: closed, to be opened again on the next attempt");
                Err(CheckpointError::Failed {
                    dir: self.dir.clone(),
                    detail: e.to_string(),
                })
            }
            r => r,
        }
    }

    /// Opens the store for reading while a running daemon holds it, as RocksDB's secondary
    /// instance: unlike a plain read-only open, it follows the daemon's flushes and log
    /// switches, so a write the daemon made is never missed.
    pub fn open_read_only(dir: &Path) -> Result<Self, CheckpointError> {
        let open_err = |detail: String| CheckpointError::Open {
            dir: dir.to_path_buf(),
            detail,
        };
        static VIEWS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let scratch = std::env::temp_dir().join(format!(
            "bitclone9-view-{}-{}-{nanos}",
            std::process::id(),
            VIEWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut opts = rocksdb::Options::default();
        opts.set_max_open_files(-1);
        let db = rocksdb::DB::open_as_secondary(&opts, &dir.join("checkpoints"), &scratch)
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&scratch);
                open_err(e.to_string())
            })?;
        let view = Self {
            db: RwLock::new(Some(db)),
            dir: dir.to_path_buf(),
            _secondary: Some(Scratch(scratch)),
        };
        view.with_db(|db| Ok(db.try_catch_up_with_primary()?))
            .map_err(|e| open_err(format!("catching up with the running daemon: {e}")))?;
        Ok(view)
    }

    /// Records the Kafka offsets a sink has applied to its target (synced, in one write).
    pub fn save_sink_offsets(
        &self,
        sink: &str,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), CheckpointError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (topic, partition, offset) in offsets {
            batch.put(
                format!("sink/{sink}/{topic}/{partition}"),
                offset.to_be_bytes(),
            );
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// A sink's checkpointed offsets: (topic, partition, last applied offset).
    pub fn load_sink_offsets(
        &self,
        sink: &str,
    ) -> Result<Vec<(String, i32, i64)>, CheckpointError> {
        let prefix = format!("sink/{sink}/");
        self.with_db(|db| {
            let mut out = Vec::new();
            for kv in db.prefix_iterator(prefix.as_bytes()) {
                let (k, v) = kv?;
                let Some(rest) = k.strip_prefix(prefix.as_bytes()) else {
                    break;
                };
                let key = String::from_utf8_lossy(rest).to_string();
                let corrupt = || CheckpointError::Corrupt(format!("{prefix}{key}"));
                let (topic, partition) = key.rsplit_once('/').ok_or_else(corrupt)?;
                let partition: i32 = partition.parse().map_err(|_| corrupt())?;
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| corrupt())?;
                out.push((topic.to_string(), partition, i64::from_be_bytes(bytes)));
            }
            Ok(out)
        })
    }

    /// Forgets a sink's offsets.
    pub fn clear_sink(&self, sink: &str) -> Result<usize, CheckpointError> {
        let keys = self.load_sink_offsets(sink)?;
        for (topic, partition, _) in &keys {
            self.with_db(|db| Ok(db.delete(format!("sink/{sink}/{topic}/{partition}"))?))?;
        }
        Ok(keys.len())
    }

    /// Writes a consistent copy of the store into `dest`, which must not exist yet: RocksDB's
    /// checkpoint (hard links where possible) of a store this process holds.
    pub fn backup(&self, dest: &Path) -> Result<(), CheckpointError> {
        self.with_db(|db| Ok(rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(dest)?))
    }

    /// Copies a store a running daemon holds, as of now, key by key into a new store at `dest`.
    /// (A checkpoint of a read-only view would miss what is still only in the daemon's log.)
    pub fn backup_live(dir: &Path, dest: &Path) -> Result<(), CheckpointError> {
        let view = Self::open_read_only(dir)?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_error_if_exists(true);
        let copy = rocksdb::DB::open(&opts, dest).map_err(|e| CheckpointError::Open {
            dir: dest.to_path_buf(),
            detail: e.to_string(),
        })?;
        let batch = view.with_db(|db| {
            let mut batch = rocksdb::WriteBatch::default();
            for kv in db.iterator(rocksdb::IteratorMode::Start) {
                let (k, v) = kv?;
                batch.put(k, v);
            }
            Ok(batch)
        })?;
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        copy.write_opt(batch, &w)?;
        copy.flush()?;
        Ok(())
    }

    /// Replaces the store under `dir` with the backup in `src`, keeping the replaced one beside
    /// it (`checkpoints.replaced-<unix time>`). Refused while a daemon holds the store.
    pub fn restore(dir: &Path, src: &Path) -> Result<PathBuf, CheckpointError> {
        let bad = |detail: String| CheckpointError::Open {
            dir: src.to_path_buf(),
            detail,
        };
        rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), src, false)
            .map_err(|e| bad(format!("not a checkpoint store backup: {e}")))?;
        drop(Self::open(dir)?);
        let current = dir.join("checkpoints");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let kept = dir.join(format!("checkpoints.replaced-{stamp}"));
        let io = |e: std::io::Error| bad(e.to_string());
        std::fs::rename(&current, &kept).map_err(io)?;
        std::fs::create_dir_all(&current).map_err(io)?;
        for entry in std::fs::read_dir(src).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_type().map_err(io)?.is_file() {
                std::fs::copy(entry.path(), current.join(entry.file_name())).map_err(io)?;
            }
        }
        Self::open(dir)?;
        Ok(kept)
    }

    fn get_lsn(&self, key: &str) -> Result<Option<Lsn>, CheckpointError> {
        match self.with_db(|db| Ok(db.get(key)?))? {
            None => Ok(None),
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| CheckpointError::Corrupt(key.to_string()))?;
                Ok(Some(Lsn(u64::from_be_bytes(bytes))))
            }
        }
    }

    fn put_sync(&self, key: &str, lsn: Lsn) -> Result<(), CheckpointError> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.put_opt(key, lsn.0.to_be_bytes(), &w)?))
    }

    pub fn load_source(&self, source: &str) -> Result<ResumeState, CheckpointError> {
        Ok(ResumeState {
            lsn: self.get_lsn(&lsn_key(source))?,
            snapshot_done: self.get_lsn(&snapshot_key(source))?.is_some(),
            resync: self.pending_resyncs(source)?,
            shapes: self.shapes(source)?,
        })
    }

    /// The entries under a per-table `prefix` (see `table_key`), each decoded by `value`.
    fn scan_tables<T>(
        &self,
        prefix: &str,
        value: impl Fn(&[u8]) -> Option<T>,
    ) -> Result<Vec<(TableId, T)>, CheckpointError> {
        self.with_db(|db| {
            let mut out = Vec::new();
            for kv in db.prefix_iterator(prefix.as_bytes()) {
                let (k, v) = kv?;
                let Some(rest) = k.strip_prefix(prefix.as_bytes()) else {
                    break;
                };
                let corrupt = || CheckpointError::Corrupt(String::from_utf8_lossy(&k).into());
                let (schema, name): (String, String) =
                    serde_json::from_slice(rest).map_err(|_| corrupt())?;
                out.push((TableId::new(schema, name), value(&v).ok_or_else(corrupt)?));
            }
            Ok(out)
        })
    }

    /// The column numbers last stored for each table of `source`.
    pub fn shapes(&self, source: &str) -> Result<HashMap<TableId, TableShape>, CheckpointError> {
        let shapes = self.scan_tables(&shape_prefix(source), |v| {
            let stored: StoredShape = serde_json::from_slice(v).ok()?;
            Some(TableShape {
                lsn: Lsn(stored.lsn),
                attnums: stored.attnums,
                relation_id: stored.relation_id,
            })
        })?;
        Ok(shapes.into_iter().collect())
    }

    /// Stores `table`'s shape, and with `resync` a request to read it again, in one durable
    /// write: a crash never leaves the new shape stored without the resync it calls for.
    pub fn record_shape(
        &self,
        source: &str,
        table: &TableId,
        shape: &TableShape,
        resync: bool,
    ) -> Result<(), CheckpointError> {
        let stored = StoredShape {
            lsn: shape.lsn.0,
            attnums: shape.attnums.clone(),
            relation_id: shape.relation_id,
        };
        let value = serde_json::to_vec(&stored)
            .map_err(|e| CheckpointError::Corrupt(format!("shape of {table}: {e}")))?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(shape_key(source, table), value);
        if resync {
            batch.put(resync_key(source, table), b"");
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// The tables of `source` whose resync was asked for and not yet delivered.
    pub fn pending_resyncs(&self, source: &str) -> Result<Vec<TableId>, CheckpointError> {
        let tables = self.scan_tables(&resync_prefix(source), |_| Some(()))?;
        Ok(tables.into_iter().map(|(t, ())| t).collect())
    }

    /// Records (durably) that `table` of `source` is to be read again; the request survives a
    /// crash until the resync is delivered. One key per table, so that recording a request and
    /// finishing another never overwrite each other. Returns false when it was already pending.
    pub fn request_resync(&self, source: &str, table: &TableId) -> Result<bool, CheckpointError> {
        let key = resync_key(source, table);
        if self.with_db(|db| Ok(db.get(&key)?))?.is_some() {
            return Ok(false);
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.put_opt(&key, b"", &w)?))?;
        Ok(true)
    }

    /// Forgets the resync requests of `done` (delivered); others stay.
    pub fn finish_resyncs(&self, source: &str, done: &[TableId]) -> Result<(), CheckpointError> {
        let mut batch = rocksdb::WriteBatch::default();
        for t in done {
            batch.delete(resync_key(source, t));
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// Stores the source's confirmed position if it is ahead of the stored one.
    pub fn save_source_lsn(&self, source: &str, lsn: Lsn) -> Result<(), CheckpointError> {
        let key = lsn_key(source);
        if self.get_lsn(&key)?.is_some_and(|cur| cur >= lsn) {
            return Ok(());
        }
        self.put_sync(&key, lsn)
    }

    /// Records that the source's snapshot (taken at `consistent_point`) is delivered.
    pub fn mark_snapshot_done(
        &self,
        source: &str,
        consistent_point: Lsn,
    ) -> Result<(), CheckpointError> {
        // One write: a reader never sees the snapshot recorded without its position.
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(snapshot_key(source), consistent_point.0.to_be_bytes());
        if self
            .get_lsn(&lsn_key(source))?
            .is_none_or(|cur| cur < consistent_point)
        {
            batch.put(lsn_key(source), consistent_point.0.to_be_bytes());
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// Records that `table` of `source` was dropped, found when the server's WAL was at `lsn`,
    /// and forgets its shape, in one durable write: the drop is announced on the table's topic
    /// once the stream has passed `lsn` (see `pipeline::drops`), also after a crash.
    pub fn record_drop(
        &self,
        source: &str,
        table: &TableId,
        lsn: Lsn,
    ) -> Result<(), CheckpointError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(drop_key(source, table), lsn.0.to_be_bytes());
        batch.delete(shape_key(source, table));
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// Drops of `source`'s tables recorded and not announced yet, with the WAL position each
    /// was found at.
    pub fn pending_drops(&self, source: &str) -> Result<Vec<(TableId, Lsn)>, CheckpointError> {
        self.scan_tables(&drop_prefix(source), |v| {
            Some(Lsn(u64::from_be_bytes(v.try_into().ok()?)))
        })
    }

    /// Forgets the drop of `table` found at `lsn` (announced). A later drop of a table of the
    /// same name, recorded meanwhile, stays.
    pub fn finish_drop(
        &self,
        source: &str,
        table: &TableId,
        lsn: Lsn,
    ) -> Result<(), CheckpointError> {
        let key = drop_key(source, table);
        if self.with_db(|db| Ok(db.get(&key)?))?.as_deref() != Some(&lsn.0.to_be_bytes()[..]) {
            return Ok(());
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.delete_opt(&key, &w)?))
    }

    /// Forgets the shapes of `tables`: they are no longer captured, so neither a column added
    /// to them nor their drop concerns the source any more.
    pub fn forget_shapes(&self, source: &str, tables: &[TableId]) -> Result<(), CheckpointError> {
        let mut batch = rocksdb::WriteBatch::default();
        for t in tables {
            batch.delete(shape_key(source, t));
        }
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.with_db(|db| Ok(db.write_opt(batch, &w)?))
    }

    /// Forgets a source's snapshot record and table shapes (its slot was re-created: a new
    /// snapshot is due, and stores the shapes anew).
    pub fn clear_source(&self, source: &str) -> Result<(), CheckpointError> {
        let prefix = shape_prefix(source);
        self.with_db(|db| {
            let mut batch = rocksdb::WriteBatch::default();
            batch.delete(snapshot_key(source));
            batch.delete(lsn_key(source));
            for kv in db.prefix_iterator(prefix.as_bytes()) {
                let (k, _) = kv?;
                if !k.starts_with(prefix.as_bytes()) {
                    break;
                }
                batch.delete(k);
            }
            Ok(db.write(batch)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_survive_a_restart_with_their_resync_and_go_with_the_slot() {
        let dir = std::env::temp_dir().join(format!("bc9-shapes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (TableId::new("public", "a.b"), TableId::new("s/x", "t"));
        let shape = |lsn: u64, attnums: &[i16]| TableShape {
            relation_id: 0,
            lsn: Lsn(lsn),
            attnums: attnums.to_vec(),
        };
        {
            let store = CheckpointStore::open(&dir).expect("open");
            store
                .record_shape("src", &a, &shape(10, &[1, 2]), false)
                .expect("record");
            store
                .record_shape("src", &a, &shape(20, &[1, 2, 4]), true)
                .expect("record");
            store
                .record_shape("src", &b, &shape(15, &[1]), false)
                .expect("record");
            store
                .record_shape("src2", &b, &shape(5, &[3]), false)
                .expect("record");
        }
        let store = CheckpointStore::open(&dir).expect("reopen");
        let loaded = store.load_source("src").expect("load");
        assert_eq!(loaded.shapes.len(), 2);
        assert_eq!(loaded.shapes[&a], shape(20, &[1, 2, 4]));
        assert_eq!(loaded.shapes[&b], shape(15, &[1]));
        assert_eq!(loaded.resync, vec![a.clone()]);
        store.clear_source("src").expect("clear");
        assert!(store.shapes("src").expect("read").is_empty());
        assert_eq!(store.shapes("src2").expect("read")[&b], shape(5, &[3]));
        // The resync request outlives the slot: the new snapshot answers it.
        assert_eq!(store.pending_resyncs("src").expect("read"), vec![a]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drops_are_kept_until_announced_and_take_the_shape_with_them() {
        let dir = std::env::temp_dir().join(format!("bc9-drops-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (TableId::new("public", "a"), TableId::new("public", "b"));
        let shape = TableShape {
            lsn: Lsn(10),
            attnums: vec![1, 2],
            relation_id: 16384,
        };
        {
            let store = CheckpointStore::open(&dir).expect("open");
            store.record_shape("src", &a, &shape, false).expect("shape");
            store.record_shape("src", &b, &shape, false).expect("shape");
            store.record_drop("src", &a, Lsn(100)).expect("drop");
        }
        let store = CheckpointStore::open(&dir).expect("reopen");
        assert_eq!(
            store.pending_drops("src").expect("read"),
            vec![(a.clone(), Lsn(100))]
        );
        assert!(store.pending_drops("src2").expect("read").is_empty());
        let shapes = store.shapes("src").expect("read");
        assert!(!shapes.contains_key(&a) && shapes.contains_key(&b));
        // A table of the same name dropped again before the first drop was announced: the
        // announcement of the first leaves the second pending.
        store.record_drop("src", &a, Lsn(200)).expect("drop");
        store.finish_drop("src", &a, Lsn(100)).expect("finish");
        assert_eq!(
            store.pending_drops("src").expect("read"),
            vec![(a.clone(), Lsn(200))]
        );
        store.finish_drop("src", &a, Lsn(200)).expect("finish");
        assert!(store.pending_drops("src").expect("read").is_empty());
        store
            .forget_shapes("src", std::slice::from_ref(&b))
            .expect("forget");
        assert!(store.shapes("src").expect("read").is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resync_requests_are_kept_per_table_until_finished() {
        let dir = std::env::temp_dir().join(format!("bc9-resync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (TableId::new("public", "a.b"), TableId::new("s/x", "t"));
        {
            let store = CheckpointStore::open(&dir).expect("open");
            assert!(store.request_resync("src", &a).expect("request"));
            assert!(store.request_resync("src", &b).expect("request"));
            assert!(!store.request_resync("src", &a).expect("again"));
            assert!(store.request_resync("src2", &a).expect("other source"));
            store
                .finish_resyncs("src", std::slice::from_ref(&a))
                .expect("finish");
        }
        let store = CheckpointStore::open(&dir).expect("reopen");
        assert_eq!(store.pending_resyncs("src").expect("read"), vec![b.clone()]);
        assert_eq!(store.load_source("src").expect("load").resync, vec![b]);
        assert_eq!(store.pending_resyncs("src2").expect("read"), vec![a]);
        assert!(store.pending_resyncs("sr").expect("read").is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn chattr(flag: &str, dir: &Path) {
        let ok = std::process::Command::new("chattr")
            .args(["-R", flag])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chattr -R {flag} {}: this test needs root and a filesystem with the immutable flag (ext4), as the stack's machine has", dir.display());
    }

    /// A state directory that cannot be written fails the store's calls with an error naming it;
    /// once it is writable again the store works again by itself, with what it held.
    #[test]
    fn the_store_recovers_by_itself_once_its_directory_is_writable_again() {
        let dir = std::env::temp_dir().join(format!("bc9-ckpt-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = CheckpointStore::open(&dir).expect("opens");
        s.save_source_lsn("a", Lsn(100)).expect("saves");
        chattr("+i", &dir);
        let failed = s.save_source_lsn("a", Lsn(200));
        let again = s.save_source_lsn("a", Lsn(300));
        chattr("-i", &dir);
        let err = failed.expect_err("a write into an immutable directory fails");
        assert!(
            matches!(err, CheckpointError::Failed { .. })
                && err.to_string().contains("state directory"),
            "{err}"
        );
        assert!(
            again.is_err(),
            "still failing while the directory is immutable"
        );
        s.save_source_lsn("a", Lsn(400))
            .expect("writes again once the directory is writable");
        assert_eq!(s.load_source("a").expect("loads").lsn, Some(Lsn(400)));
        drop(s);
        let reopened = CheckpointStore::open(&dir).expect("opens");
        assert_eq!(
            reopened.load_source("a").expect("loads").lsn,
            Some(Lsn(400))
        );
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn positions_never_move_backward_and_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("bc9-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = CheckpointStore::open(&dir).expect("opens");
            assert_eq!(s.load_source("a").expect("loads"), ResumeState::default());
            s.save_source_lsn("a", Lsn(100)).expect("saves");
            s.save_source_lsn("a", Lsn(50)).expect("saves");
            assert_eq!(s.load_source("a").expect("loads").lsn, Some(Lsn(100)));
            s.mark_snapshot_done("b", Lsn(7)).expect("saves");
            assert!(
                CheckpointStore::open(&dir).is_err(),
                "a second opener is refused"
            );
        }
        let s = CheckpointStore::open(&dir).expect("reopens");
        assert_eq!(s.load_source("a").expect("loads").lsn, Some(Lsn(100)));
        let b = s.load_source("b").expect("loads");
        assert!(b.snapshot_done);
        assert_eq!(b.lsn, Some(Lsn(7)));
        s.clear_source("b").expect("clears");
        s.save_sink_offsets("k", &[("t.a".into(), 0, 5), ("t.a".into(), 1, 9)])
            .expect("saves");
        s.save_sink_offsets("k", &[("t.a".into(), 0, 7)])
            .expect("saves");
        s.save_sink_offsets("k2", &[("t.b".into(), 0, 1)])
            .expect("saves");
        assert_eq!(
            s.load_sink_offsets("k").expect("loads"),
            vec![("t.a".to_string(), 0, 7), ("t.a".to_string(), 1, 9)]
        );
        assert_eq!(s.clear_sink("k").expect("clears"), 2);
        assert!(s.load_sink_offsets("k").expect("loads").is_empty());
        assert_eq!(s.load_sink_offsets("k2").expect("loads").len(), 1);
        // Backup, change, restore: the backup's content comes back.
        let backup = dir.join("backup");
        s.backup(&backup).expect("backup");
        s.save_source_lsn("a", Lsn(500)).expect("saves");
        drop(s);
        let kept = CheckpointStore::restore(&dir, &backup).expect("restore");
        assert!(kept.exists(), "the replaced store is kept");
        let s = CheckpointStore::open(&dir).expect("reopens");
        assert_eq!(s.load_source("a").expect("loads").lsn, Some(Lsn(100)));
        assert!(
            CheckpointStore::restore(&dir, &backup).is_err(),
            "refused while open"
        );
        assert!(CheckpointStore::restore(&dir, &dir.join("nothing")).is_err());
        assert_eq!(s.load_source("b").expect("loads"), ResumeState::default());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
