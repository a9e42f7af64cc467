//! Tables dropped at the source, announced on their topics.
//!
//! ```text
//!  start / catalog check ── table's relation gone ──► CheckpointStore::record_drop(table, C)
//!                                                        │ pending (survives restarts)
//!  the stream passed C ─────────────────────────────────►├─► EventWriter::send_drop_marker
//!  or a table of that name is published again (and is ──►┘     │ a truncate with the header
//!  about to be read: the announcement goes first)               ▼ bitclone9.dropped = true
//!                                                          acker: delivered ─► finish_drop
//! ```
//!
//! `C` is the server's WAL position when the drop was found, so every change of the dropped
//! table commits below it: announced once the stream passed `C`, the drop follows all of
//! them on every partition, and a sink that keeps the target table (`on_table_drop = "keep"`)
//! has applied them all. A table of the same name created again is read at a position above
//! `C` (its snapshot starts after the drop was found), so the announcement goes before its
//! rows; changes of the old table the stream still replays after it are below it, and a sink
//! skips them, as the new table's read replaces the target's rows anyway.

use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::status::Status;
use bitclone9_core::{Lsn, TableId};

/// Drops found and not announced yet, with the WAL position each was found at.
pub(super) struct PendingDrops {
    pending: Vec<(TableId, Lsn)>,
}

impl PendingDrops {
    pub fn load(store: &CheckpointStore, source: &str) -> Result<Self, CheckpointError> {
        Ok(Self {
            pending: store.pending_drops(source)?,
        })
    }

    /// Records drops just found (durably, with their shapes forgotten), and reports them.
    pub fn record(
        &mut self,
        store: &CheckpointStore,
        status: &Status,
        source: &str,
        found: &[(TableId, Lsn)],
    ) -> Result<(), CheckpointError> {
        if found.is_empty() {
            return Ok(());
        }
        for (table, lsn) in found {
            store.record_drop(source, table, *lsn)?;
            self.pending.retain(|(t, _)| t != table);
            self.pending.push((table.clone(), *lsn));
            status.note(source, format!("table {table} was dropped at the source; the drop is announced on its topic, and each sink keeps or drops its target table as its on_table_drop says"));
        }
        let names: Vec<String> = found.iter().map(|(t, _)| t.to_string()).collect();
        tracing::warn!(connector = %source, tables = %names.join(", "), lsn = %found[0].1,
            "tables dropped at the source: their drop is announced on their topics once the stream has passed this position (the topics are kept)");
        metrics::counter!("bitclone9_source_tables_dropped_total", "connector" => source.to_string())
            .increment(found.len() as u64);
        Ok(())
    }

    /// Takes the drops to announce now: those of tables published again (a table of the same
    /// name is about to be read), and, unless `republished_only`, those the stream has passed.
    pub fn due(
        &mut self,
        position: Option<Lsn>,
        republished_only: bool,
        published: impl Fn(&TableId) -> bool,
    ) -> Vec<(TableId, Lsn)> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, lsn)| {
                published(t) || (!republished_only && position.is_some_and(|p| p >= *lsn))
            });
        self.pending = rest;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_is_due_once_passed_or_at_once_when_its_name_is_published_again() {
        let (a, b) = (TableId::new("public", "a"), TableId::new("public", "b"));
        let mut d = PendingDrops {
            pending: vec![(a.clone(), Lsn(100)), (b.clone(), Lsn(100))],
        };
        assert!(d.due(Some(Lsn(99)), false, |_| false).is_empty());
        assert!(d.due(None, false, |_| false).is_empty());
        // Before a batch: only a table published again goes first.
        assert_eq!(
            d.due(Some(Lsn(500)), true, |t| *t == b),
            vec![(b, Lsn(100))]
        );
        assert_eq!(d.due(Some(Lsn(100)), false, |_| false), vec![(a, Lsn(100))]);
        assert!(d.due(Some(Lsn(1000)), false, |_| true).is_empty());
    }
}
