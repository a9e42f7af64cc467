//! Decoder of pgoutput row messages, with no I/O.
//!
//! The replication client already splits the stream into Begin, Commit and logical Message events;
//! everything else arrives as raw `XLogData` payloads and is decoded here: Relation, Type, Origin,
//! Insert, Update, Delete and Truncate. Column values are borrowed from the payload; the caller turns
//! them into typed values once it knows the column types.
//!
//! With protocol version 2 and streaming on, a large transaction also arrives in segments while
//! it runs ([`stream_control`] reads Stream Start/Stop/Commit/Abort); inside a segment each
//! message has its (sub)transaction's xid after the tag ([`split_xid`] takes it out, leaving the
//! version-1 layout [`decode`] reads).

use bytes::Bytes;

/// A payload that is not a well-formed pgoutput message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pgoutput message {tag:?}: {what}")]
pub struct DecodeError {
    pub tag: char,
    pub what: String,
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity.
    pub is_identity: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value left unchanged by an update: not sent.
    UnchangedToast,
    /// The text form of the value.
    Text(Bytes),
    /// The binary form of the value (only when binary mode is on).
    Binary(Bytes),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation {
        relation_id: u32,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<RelationColumn>,
    },
    Type {
        type_oid: u32,
        namespace: String,
        name: String,
    },
    Origin,
    Insert {
        relation_id: u32,
        new: Vec<TupleValue>,
    },
    Update {
        relation_id: u32,
        /// The old key ('K') or old full row ('O'), when sent.
        old: Option<Vec<TupleValue>>,
        old_is_key_only: bool,
        new: Vec<TupleValue>,
    },
    Delete {
        relation_id: u32,
        old: Vec<TupleValue>,
        old_is_key_only: bool,
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relation_ids: Vec<u32>,
    },
    /// Begin, Commit and Message are handled by the replication client; others are ignored.
    Other(u8),
}

struct Reader<'a> {
    tag: char,
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            tag: self.tag,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "needs {n} bytes at offset {}, has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.i32()? as u32)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("string without terminating NUL"))?;
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err(format!("negative column count {n}")));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let kind = self.u8()?;
            values.push(match kind {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' | b'b' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.err(format!("negative value length {len}")));
                    }
                    let start = self.pos;
                    self.take(len as usize)?;
                    let v = self.buf.slice(start..start + len as usize);
                    if kind == b't' {
                        TupleValue::Text(v)
                    } else {
                        TupleValue::Binary(v)
                    }
                }
                other => {
                    return Err(self.err(format!("unknown tuple value kind {:?}", other as char)))
                }
            });
        }
        Ok(values)
    }
}

/// The messages that frame a streamed transaction (protocol version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamControl {
    /// A segment of transaction `xid` begins; `first` when it is the transaction's first.
    Start { xid: u32, first: bool },
    /// The current segment ends.
    Stop,
    /// Transaction `xid` committed at `commit_lsn`; `end_lsn` is just past its commit record.
    Commit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// Subtransaction `subxid` of `xid` rolled back; the whole transaction when they are equal.
    Abort { xid: u32, subxid: u32 },
}

/// Reads a Stream Start, Stop, Commit or Abort message; `None` for any other message.
pub fn stream_control(buf: &Bytes) -> Result<Option<StreamControl>, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let mut r = Reader {
        tag: tag as char,
        buf,
        pos: 1,
    };
    Ok(Some(match tag {
        b'S' => StreamControl::Start {
            xid: r.u32()?,
            first: r.u8()? == 1,
        },
        b'E' => StreamControl::Stop,
        b'c' => {
            let xid = r.u32()?;
            r.u8()?; // flags, unused
            StreamControl::Commit {
                xid,
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.u64()? as i64,
            }
        }
        b'A' => StreamControl::Abort {
            xid: r.u32()?,
            subxid: r.u32()?,
        },
        _ => return Ok(None),
    }))
}

/// Splits a message from inside a streamed segment into its (sub)transaction's xid and the
/// rest, which is the message's version-1 layout without its tag.
pub fn split_xid(buf: &Bytes) -> Result<(u8, u32, &[u8]), DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            tag: '?',
            what: "empty message".into(),
        });
    };
    let mut r = Reader {
        tag: tag as char,
        buf,
        pos: 1,
    };
    let xid = r.u32()?;
    Ok((tag, xid, &buf[5..]))
}

/// Decodes one pgoutput message.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            tag: '?',
            what: "empty message".into(),
        });
    };
    let mut r = Reader {
        tag: tag as char,
        buf,
        pos: 1,
    };
    let msg = match tag {
        b'R' => {
            let relation_id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    is_identity: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                relation_id,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            type_oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'O' => {
            r.take(8)?;
            r.cstr()?;
            Message::Origin
        }
        b'I' => {
            let relation_id = r.u32()?;
            match r.u8()? {
                b'N' => {}
                other => return Err(r.err(format!("expected 'N', got {:?}", other as char))),
            }
            Message::Insert {
                relation_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32()?;
            let (mut old, mut old_is_key_only) = (None, false);
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old_is_key_only = kind == b'K';
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.err(format!("expected 'N', got {:?}", kind as char)));
            }
            Message::Update {
                relation_id,
                old,
                old_is_key_only,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_id = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(r.err(format!("expected 'K' or 'O', got {:?}", kind as char)));
            }
            Message::Delete {
                relation_id,
                old: r.tuple()?,
                old_is_key_only: kind == b'K',
            }
        }
        b'T' => {
            let n = r.i32()?;
            let options = r.u8()?;
            let mut relation_ids = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n.max(0) {
                relation_ids.push(r.u32()?);
            }
            Message::Truncate {
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
                relation_ids,
            }
        }
        other => Message::Other(other),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> Vec<u8> {
        let mut b = vec![b't'];
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
        b
    }

    #[test]
    fn decodes_relation() {
        let mut b = vec![b'R'];
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.extend_from_slice(b"public\0items\0d");
        b.extend_from_slice(&2i16.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"id\0");
        b.extend_from_slice(&20u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.push(0);
        b.extend_from_slice(b"price\0");
        b.extend_from_slice(&1700u32.to_be_bytes());
        b.extend_from_slice(&(((10 << 16) | 2) + 4i32).to_be_bytes());
        let m = decode(&Bytes::from(b)).expect("decodes");
        assert_eq!(
            m,
            Message::Relation {
                relation_id: 16384,
                namespace: "public".into(),
                name: "items".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn {
                        is_identity: true,
                        name: "id".into(),
                        type_oid: 20,
                        type_modifier: -1
                    },
                    RelationColumn {
                        is_identity: false,
                        name: "price".into(),
                        type_oid: 1700,
                        type_modifier: 655366
                    },
                ]
            }
        );
    }

    #[test]
    fn decodes_update_with_old_key_and_toast() {
        let mut b = vec![b'U'];
        b.extend_from_slice(&7u32.to_be_bytes());
        b.push(b'K');
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend(text("1"));
        b.push(b'n');
        b.push(b'N');
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend(text("2"));
        b.push(b'u');
        let m = decode(&Bytes::from(b)).expect("decodes");
        assert_eq!(
            m,
            Message::Update {
                relation_id: 7,
                old: Some(vec![
                    TupleValue::Text(Bytes::from_static(b"1")),
                    TupleValue::Null
                ]),
                old_is_key_only: true,
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"2")),
                    TupleValue::UnchangedToast
                ],
            }
        );
    }

    #[test]
    fn decodes_truncate() {
        let mut b = vec![b'T'];
        b.extend_from_slice(&2i32.to_be_bytes());
        b.push(3);
        b.extend_from_slice(&5u32.to_be_bytes());
        b.extend_from_slice(&6u32.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(b)).expect("decodes"),
            Message::Truncate {
                cascade: true,
                restart_identity: true,
                relation_ids: vec![5, 6]
            }
        );
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        let mut full = vec![b'I'];
        full.extend_from_slice(&7u32.to_be_bytes());
        full.push(b'N');
        full.extend_from_slice(&1i16.to_be_bytes());
        full.extend(text("hello"));
        assert!(decode(&Bytes::from(full.clone())).is_ok());
        for cut in 0..full.len() {
            let r = decode(&Bytes::from(full[..cut].to_vec()));
            assert!(r.is_err(), "prefix of {cut} bytes must not decode");
        }
        // Every byte string, decoded or not, must come back without panicking.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"RYOIUDTNKOntub\0\x01\xff"[(seed % 17) as usize]
                })
                .collect();
            let _ = decode(&Bytes::from(bytes));
        }
        let mut neg = vec![b'I'];
        neg.extend_from_slice(&7u32.to_be_bytes());
        neg.push(b'N');
        neg.extend_from_slice(&1i16.to_be_bytes());
        neg.push(b't');
        neg.extend_from_slice(&(-5i32).to_be_bytes());
        assert!(decode(&Bytes::from(neg)).is_err());
    }
}
