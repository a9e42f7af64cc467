//! Streamed transactions, kept on disk until they end.
//!
//! With protocol version 2 and streaming on, PostgreSQL sends a transaction that outgrows
//! `logical_decoding_work_mem` in segments while it is still being written, between other
//! transactions' commits. Nothing of it may reach Kafka before its Stream Commit (it may still
//! roll back, wholly or a subtransaction at a time), and then it must arrive whole, at its
//! place in commit order. So every segment is appended to a file of its own transaction and
//! read back, in order, at the commit:
//!
//! ```text
//!   Stream Start(xid) ─ I/U/D/T/R/Y (each tagged with its subxid) ─ Stream Stop   (× segments)
//!        │ append: [subxid u32][len u32][message, version-1 layout]   → <dir>/<xid>.spool
//!   Stream Abort(xid, subxid) → the file is deleted (whole abort), or the subxid is skipped later
//!   Stream Commit(xid, lsn)   → Replay: the file's messages in order, then the commit
//! ```
//!
//! Memory stays bounded by the write and read buffers whatever the transaction's size. The
//! files belong to one source instance: its directory is removed when the instance ends, and
//! whatever earlier instances (or a killed process) left is removed when the next one opens.
//! After a reconnect PostgreSQL streams an unfinished transaction again from its first segment.

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of the buffers between a spool file and the disk.
const BUFFER_BYTES: usize = 1 << 20;

/// A failure to write or read a spool file.
#[derive(Debug, thiserror::Error)]
#[error("spool file {path} of a streamed transaction: {detail}")]
pub struct SpoolError {
    pub path: String,
    pub detail: String,
}

fn spool_err(path: &Path, e: impl std::fmt::Display) -> SpoolError {
    SpoolError {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// The open streamed transactions of one source instance.
#[derive(Debug)]
pub struct Spools {
    dir: PathBuf,
    open: HashMap<u32, Spool>,
    /// The transaction whose segment is being received, if any.
    current: Option<u32>,
}

#[derive(Debug)]
struct Spool {
    path: PathBuf,
    file: BufWriter<File>,
    bytes: u64,
    /// Subtransactions rolled back: their changes are skipped at replay.
    aborted: HashSet<u32>,
}

/// What the spools made of a message.
#[derive(Debug)]
pub enum Committed {
    /// A streamed transaction committed: replay it.
    Replay(Replay),
    /// Nothing to do now.
    Nothing,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl Spools {
    /// Opens a directory of this instance's own under `root` (one source's), after removing
    /// what earlier instances left there: a new instance starts the stream from the slot's
    /// confirmed position, so the server streams every unfinished transaction again.
    pub fn open(root: &Path) -> Result<Self, SpoolError> {
        let pid = std::process::id();
        std::fs::create_dir_all(root).map_err(|e| spool_err(root, e))?;
        if let Ok(entries) = std::fs::read_dir(root) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = root.join(format!(
            "{pid}-{}",
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| spool_err(&dir, e))?;
        Ok(Self {
            dir,
            open: HashMap::new(),
            current: None,
        })
    }

    /// Inside a segment: the message goes to [`Spools::append`].
    pub fn in_segment(&self) -> bool {
        self.current.is_some()
    }

    /// Bytes held on disk by open transactions.
    pub fn bytes(&self) -> u64 {
        self.open.values().map(|s| s.bytes).sum()
    }

    /// A segment of `xid` begins.
    pub fn start(&mut self, xid: u32, first: bool) -> Result<(), SpoolError> {
        if first || !self.open.contains_key(&xid) {
            if !first {
                return Err(SpoolError {
                    path: self.path_of(xid).display().to_string(),
                    detail: format!(
                        "a later segment of transaction {xid} arrived without its first; \
                         reconnecting streams it again from the start"
                    ),
                });
            }
            let path = self.path_of(xid);
            let file = File::create(&path).map_err(|e| spool_err(&path, e))?;
            self.open.insert(
                xid,
                Spool {
                    path,
                    file: BufWriter::with_capacity(BUFFER_BYTES, file),
                    bytes: 0,
                    aborted: HashSet::new(),
                },
            );
        }
        self.current = Some(xid);
        Ok(())
    }

    /// The current segment ends.
    pub fn stop(&mut self) {
        self.current = None;
    }

    /// Appends a message of the current segment: its tag and `body` (the version-1 layout after
    /// the tag), for subtransaction `subxid`.
    pub fn append(&mut self, tag: u8, subxid: u32, body: &[u8]) -> Result<(), SpoolError> {
        let Some(xid) = self.current else {
            return Err(SpoolError {
                path: self.dir.display().to_string(),
                detail: "a streamed change arrived outside a segment".into(),
            });
        };
        let spool = self.open.get_mut(&xid).ok_or_else(|| SpoolError {
            path: self.dir.display().to_string(),
            detail: format!("transaction {xid} has no spool"),
        })?;
        let len = u32::try_from(body.len() + 1).map_err(|e| spool_err(&spool.path, e))?;
        let write = |f: &mut BufWriter<File>| -> std::io::Result<()> {
            f.write_all(&subxid.to_be_bytes())?;
            f.write_all(&len.to_be_bytes())?;
            f.write_all(&[tag])?;
            f.write_all(body)
        };
        write(&mut spool.file).map_err(|e| spool_err(&spool.path, e))?;
        spool.bytes += 9 + body.len() as u64;
        Ok(())
    }

    /// Subtransaction `subxid` of `xid` rolled back (the whole transaction when equal).
    pub fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(spool) = self.open.remove(&xid) {
                drop(spool.file);
                let _ = std::fs::remove_file(&spool.path);
            }
        } else if let Some(spool) = self.open.get_mut(&xid) {
            spool.aborted.insert(subxid);
        }
    }

    /// Transaction `xid` committed: its messages, to be read back in order.
    pub fn commit(&mut self, xid: u32) -> Result<Replay, SpoolError> {
        let spool = self.open.remove(&xid).ok_or_else(|| SpoolError {
            path: self.path_of(xid).display().to_string(),
            detail: format!("transaction {xid} committed but none of it was streamed here"),
        })?;
        let Spool {
            path,
            file,
            bytes,
            aborted,
        } = spool;
        let file = file.into_inner().map_err(|e| spool_err(&path, e.error()))?;
        drop(file);
        let reader = File::open(&path).map_err(|e| spool_err(&path, e))?;
        Ok(Replay {
            reader: BufReader::with_capacity(BUFFER_BYTES, reader),
            path,
            bytes,
            aborted,
        })
    }

    fn path_of(&self, xid: u32) -> PathBuf {
        self.dir.join(format!("{xid}.spool"))
    }
}

impl Drop for Spools {
    fn drop(&mut self) {
        self.open.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The messages of a committed streamed transaction, read back in order; the file is removed
/// when the replay is dropped.
#[derive(Debug)]
pub struct Replay {
    reader: BufReader<File>,
    path: PathBuf,
    /// Bytes the file holds.
    pub bytes: u64,
    aborted: HashSet<u32>,
}

impl Replay {
    /// The next message not of a rolled-back subtransaction, in version-1 layout; `None` at
    /// the end.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, SpoolError> {
        loop {
            let mut head = [0u8; 8];
            match self.reader.read_exact(&mut head[..1]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(spool_err(&self.path, e)),
            }
            self.reader
                .read_exact(&mut head[1..])
                .map_err(|e| spool_err(&self.path, e))?;
            let subxid = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let mut body = vec![0u8; len];
            self.reader
                .read_exact(&mut body)
                .map_err(|e| spool_err(&self.path, e))?;
            // A rolled-back subtransaction's row changes are skipped; its Relation and Type
            // messages are not: PostgreSQL counts them as sent for the whole transaction.
            if self.aborted.contains(&subxid) && !matches!(body.first(), Some(b'R' | b'Y')) {
                continue;
            }
            return Ok(Some(Bytes::from(body)));
        }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "bitclone9-spool-test-{name}-{}",
            std::process::id()
        ))
    }

    fn all(mut r: Replay) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = r.next_message().expect("read") {
            out.push(m.to_vec());
        }
        out
    }

    #[test]
    fn segments_replay_in_order_without_rolled_back_subtransactions() {
        let mut s = Spools::open(&root("order")).expect("open");
        s.start(7, true).expect("spool");
        s.append(b'R', 7, b"rel").expect("spool");
        s.append(b'I', 7, b"one").expect("spool");
        s.stop();
        s.start(9, true).expect("spool");
        s.append(b'I', 9, b"other").expect("spool");
        s.stop();
        s.start(7, false).expect("spool");
        s.append(b'R', 8, b"rel2").expect("spool");
        s.append(b'I', 8, b"rolled back").expect("spool");
        s.append(b'I', 7, b"two").expect("spool");
        s.stop();
        s.abort(7, 8);
        s.abort(9, 9);
        assert_eq!(s.open.len(), 1);
        let r = s.commit(7).expect("commit");
        assert_eq!(
            all(r),
            vec![
                b"Rrel".to_vec(),
                b"Ione".to_vec(),
                b"Rrel2".to_vec(),
                b"Itwo".to_vec()
            ]
        );
        assert!(
            s.commit(9).is_err(),
            "an aborted transaction has nothing to replay"
        );
    }

    #[test]
    fn a_later_segment_without_the_first_is_an_error_and_files_go_with_the_instance() {
        let dir = root("missing");
        let mut s = Spools::open(&dir).expect("open");
        assert!(s.start(3, false).is_err());
        s.start(4, true).expect("spool");
        s.append(b'I', 4, b"x").expect("spool");
        let own = s.dir.clone();
        assert!(own.join("4.spool").exists());
        drop(s);
        assert!(!own.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn what_earlier_instances_left_is_removed() {
        let dir = root("stale");
        std::fs::create_dir_all(dir.join("1-0")).expect("spool");
        std::fs::write(dir.join("1-0").join("5.spool"), b"old").expect("spool");
        let s = Spools::open(&dir).expect("open");
        assert!(!dir.join("1-0").exists());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}
