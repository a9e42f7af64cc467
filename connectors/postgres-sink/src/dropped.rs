//! A table dropped at the source, as the sink meets it: a truncate record with the header
//! `bitclone9.dropped` that the source wrote to every partition of the table's topic once
//! every change of the table was on Kafka. It passes the truncate barrier like any truncate;
//! then the sink's `on_table_drop` decides what becomes of the target table.
//!
//! ```text
//!  drop announcement ──► TableDrop::Keep ─► rows stay as the source last had them
//!  (once, in the batch's     TableDrop::Drop ─► DROP TABLE
//!   target transaction)  both: the table's column record (bitclone9.source_columns) and
//!                        caches are forgotten, so a table created again under the name
//!                        is followed afresh
//! ```

use crate::{db_error, ident, PostgresTarget, TargetError};
use bitclone9_core::TableId;

/// What the sink does with a target table whose source table was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableDrop {
    /// Keep it, with the rows it had when the source dropped its table.
    #[default]
    Keep,
    /// Drop it too.
    Drop,
}

impl PostgresTarget {
    /// Applies the drop of `table` at the source, inside the open transaction. Returns whether
    /// the target table was dropped (false: kept, or there was none).
    pub async fn table_dropped(&mut self, table: &TableId) -> Result<bool, TargetError> {
        let target = self.target_of(table);
        let shown = target.to_string();
        let exists = !self.existing_columns(&target).await?.is_empty();
        let dropped = match self.cfg.on_table_drop {
            TableDrop::Drop if exists => {
                let sql = format!(
                    "DROP TABLE {}.{}",
                    ident(&target.schema),
                    ident(&target.name)
                );
                self.client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| match e.as_db_error() {
                        // Views, foreign keys or other objects that depend on it: an operator
                        // decides (the sink retries until then).
                        Some(d) if d.code().code() == "2BP01" => TargetError::SchemaChange {
                            table: shown.clone(),
                            detail: format!(
                                "was dropped at the source, and on_table_drop = \"drop\" cannot drop it: {}{}; drop what depends on it (or run DROP TABLE {}.{} CASCADE), or set on_table_drop = \"keep\"",
                                d.message(),
                                d.detail().map(|x| format!(" ({x})")).unwrap_or_default(),
                                ident(&target.schema),
                                ident(&target.name)
                            ),
                        },
                        _ => db_error(&shown, e),
                    })?;
                true
            }
            _ => false,
        };
        self.client
            .execute(
                "DELETE FROM bitclone9.source_columns WHERE target_schema = $1 AND target_table = $2",
                &[&target.schema, &target.name],
            )
            .await
            .map_err(|e| db_error("bitclone9.source_columns", e))?;
        self.forget(table);
        Ok(dropped)
    }

    /// Forgets what this session knows of `table`'s target table (its statements, columns and
    /// column record): another session applied its drop.
    pub fn forget(&mut self, table: &TableId) {
        let target = self.target_of(table);
        self.shapes.retain(|(t, _), _| *t != target);
        self.columns.remove(&target);
        self.column_maps.remove(&target);
    }
}
