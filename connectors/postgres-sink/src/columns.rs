//! Column changes at the source followed in the target: renamed, retyped, added and dropped
//! columns, recognised by the source's column number (`attnum`, carried in each field's
//! `pg.attnum`) rather than by name, so a rename is a rename and not a drop and an add.
//!
//! ```text
//!   event shape (names, types, attnums) at position P
//!        │   compared with bitclone9.source_columns (attnum → target column, type, since)
//!        ├─ P at or after `since`: the source changed ─► RENAME / ALTER TYPE / ADD / DROP
//!        │                                                (or keep nullable), recorded at P
//!        └─ P before `since`: an older event (another partition lags) ─► its values are
//!                                                written to the columns they became
//! ```
//!
//! The record is kept in the target, in the same transaction as the DDL and the rows, so it
//! commits or vanishes with them. What a drop does is the sink's `on_column_drop`.

use crate::{db_error, ident, pg_literal, TargetError, Watermark};
use bitclone9_core::{Column, TableId, TableSchema};
use std::collections::HashMap;
use tokio_postgres::Client;

pub(crate) const SOURCE_COLUMNS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS bitclone9;
CREATE TABLE IF NOT EXISTS bitclone9.source_columns (
    target_schema text NOT NULL,
    target_table text NOT NULL,
    attnum smallint NOT NULL,
    column_name text NOT NULL,
    pg_type text NOT NULL,
    dropped boolean NOT NULL DEFAULT false,
    since_lsn numeric(20) NOT NULL,
    since_streamed boolean NOT NULL,
    since_seq bigint NOT NULL,
    PRIMARY KEY (target_schema, target_table, attnum)
)";

/// What the sink does with a target column whose source column was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColumnDrop {
    /// Keep it, with its values, and let it take NULL (rows inserted later have none).
    #[default]
    Keep,
    /// Drop it from the target too.
    Drop,
}

/// One source column as the target holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapped {
    /// The target column's name now.
    pub column: String,
    pub pg_type: String,
    pub dropped: bool,
    /// The position of the event whose shape set this entry.
    pub since: Watermark,
}

/// Every mapped column of one target table, by source attnum.
pub(crate) type ColumnMap = HashMap<i16, Mapped>;

/// How events of one shape are written: the columns as the target names them, and which of
/// the event's values go into them (`None`: all, in order).
pub(crate) struct View {
    pub schema: TableSchema,
    pub keep: Option<Vec<usize>>,
}

/// One step of DDL the target needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Rename {
        from: String,
        to: String,
    },
    Retype {
        column: String,
        from: String,
        to: String,
    },
    Add {
        column: String,
        pg_type: String,
    },
    DropColumn {
        column: String,
    },
    KeepNullable {
        column: String,
    },
}

/// What to do for an event shape: the DDL (empty for an older or unchanged shape), the map
/// after it, and how to write the events.
#[derive(Debug)]
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    pub map: ColumnMap,
    /// Indexes of the event's columns that are written, and the target name of each.
    pub written: Vec<(usize, String)>,
}

/// Plans how `table` (an event shape seen at `at`) meets the target, given the map and the
/// target's current column names. Pure: no I/O.
pub(crate) fn plan(
    table: &TableSchema,
    at: Watermark,
    map: &ColumnMap,
    existing: &[String],
    on_drop: ColumnDrop,
) -> Plan {
    let mut next = map.clone();
    let mut steps = Vec::new();
    let mut written = Vec::with_capacity(table.columns.len());
    let current = |m: &Mapped| at >= m.since;
    // Renames go through temporary names first, so swaps and chains never collide.
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut names_now: Vec<String> = existing.to_vec();
    for (i, c) in table.columns.iter().enumerate() {
        // Without a number (the source could not tell it), a column is the one of its name.
        let attnum = c.attnum.or_else(|| {
            map.iter()
                .find(|(_, m)| m.column == c.name && !m.dropped)
                .map(|(a, _)| *a)
        });
        let Some(attnum) = attnum else {
            if !existing.contains(&c.name) {
                steps.push(Step::Add {
                    column: c.name.clone(),
                    pg_type: c.pg_type.clone(),
                });
                names_now.push(c.name.clone());
            }
            written.push((i, c.name.clone()));
            continue;
        };
        match map.get(&attnum) {
            Some(m) if current(m) => {
                let mut e = m.clone();
                if m.column != c.name {
                    renames.push((m.column.clone(), c.name.clone()));
                    e.column = c.name.clone();
                }
                if m.dropped {
                    e.dropped = false;
                }
                if m.pg_type != c.pg_type {
                    steps.push(Step::Retype {
                        column: c.name.clone(),
                        from: m.pg_type.clone(),
                        to: c.pg_type.clone(),
                    });
                    e.pg_type = c.pg_type.clone();
                }
                if e != *m {
                    e.since = at;
                }
                next.insert(attnum, e);
                written.push((i, c.name.clone()));
            }
            // An older event: its value goes to the column it became, if that still exists.
            Some(m) => {
                if existing.contains(&m.column) {
                    written.push((i, m.column.clone()));
                }
            }
            None => {
                // The name may belong to the kept column of a dropped source column, which then
                // moves aside (below).
                let held_by_dropped = map
                    .iter()
                    .any(|(a, m)| *a != attnum && m.dropped && m.column == c.name);
                let exists = existing.contains(&c.name) && !held_by_dropped;
                if !exists && !renames.iter().any(|(_, to)| *to == c.name) {
                    steps.push(Step::Add {
                        column: c.name.clone(),
                        pg_type: c.pg_type.clone(),
                    });
                    names_now.push(c.name.clone());
                }
                next.insert(
                    attnum,
                    Mapped {
                        column: c.name.clone(),
                        pg_type: c.pg_type.clone(),
                        dropped: false,
                        since: at,
                    },
                );
                written.push((i, c.name.clone()));
            }
        }
    }
    // Columns of the map this shape lacks, when the shape is current: dropped at the source.
    let has_attnums = table.columns.iter().any(|c| c.attnum.is_some());
    if has_attnums {
        for (attnum, m) in map {
            if m.dropped
                || !current(m)
                || table.columns.iter().any(|c| {
                    c.attnum == Some(*attnum) || (c.attnum.is_none() && c.name == m.column)
                })
            {
                continue;
            }
            let mut e = m.clone();
            e.dropped = true;
            e.since = at;
            if existing.contains(&m.column) {
                steps.push(match on_drop {
                    ColumnDrop::Keep => Step::KeepNullable {
                        column: m.column.clone(),
                    },
                    ColumnDrop::Drop => Step::DropColumn {
                        column: m.column.clone(),
                    },
                });
            }
            next.insert(*attnum, e);
        }
    }
    // A kept column of a dropped source column in the way of a new name moves aside.
    for (attnum, m) in next.iter_mut() {
        let in_the_way = m.dropped
            && (table
                .columns
                .iter()
                .any(|c| c.name == m.column && c.attnum != Some(*attnum)));
        if in_the_way && names_now.contains(&m.column) {
            let mut n = 1;
            let mut aside = format!("{}_dropped", m.column);
            while names_now.contains(&aside) {
                n += 1;
                aside = format!("{}_dropped{n}", m.column);
            }
            renames.insert(0, (m.column.clone(), aside.clone()));
            names_now.push(aside.clone());
            m.column = aside;
        }
    }
    let mut ordered = Vec::new();
    let two_phase = renames.len() > 1;
    if two_phase {
        for (k, (from, _)) in renames.iter().enumerate() {
            ordered.push(Step::Rename {
                from: from.clone(),
                to: format!("bitclone9_renaming_{k}"),
            });
        }
        for (k, (_, to)) in renames.iter().enumerate() {
            ordered.push(Step::Rename {
                from: format!("bitclone9_renaming_{k}"),
                to: to.clone(),
            });
        }
    } else {
        for (from, to) in &renames {
            ordered.push(Step::Rename {
                from: from.clone(),
                to: to.clone(),
            });
        }
    }
    // Renames first: retypes and drops name the columns as they are after them.
    ordered.extend(steps);
    Plan {
        steps: ordered,
        map: next,
        written,
    }
}

/// The view events of `table` are written through, from a plan's `written` list.
pub(crate) fn view(table: &TableSchema, written: &[(usize, String)]) -> View {
    let identity = written.len() == table.columns.len()
        && written
            .iter()
            .enumerate()
            .all(|(k, (i, n))| k == *i && *n == table.columns[*i].name);
    let columns: Vec<Column> = written
        .iter()
        .map(|(i, n)| Column {
            name: n.clone(),
            ..table.columns[*i].clone()
        })
        .collect();
    View {
        schema: TableSchema {
            id: table.id.clone(),
            relation_id: table.relation_id,
            columns,
        },
        keep: (!identity).then(|| written.iter().map(|(i, _)| *i).collect()),
    }
}

/// The map of `target` as stored.
pub(crate) async fn load(client: &Client, target: &TableId) -> Result<ColumnMap, TargetError> {
    let rows = client
        .query(
            "SELECT attnum, column_name, pg_type, dropped, since_lsn::text, since_streamed, since_seq
               FROM bitclone9.source_columns WHERE target_schema = $1 AND target_table = $2",
            &[&target.schema, &target.name],
        )
        .await
        .map_err(|e| db_error("bitclone9.source_columns", e))?;
    let mut map = ColumnMap::new();
    for r in rows {
        let lsn: String = r.get(4);
        map.insert(
            r.get(0),
            Mapped {
                column: r.get(1),
                pg_type: r.get(2),
                dropped: r.get(3),
                since: Watermark {
                    lsn: lsn.parse().unwrap_or(0),
                    streamed: r.get(5),
                    seq: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
                    part: crate::Part::Event,
                },
            },
        );
    }
    Ok(map)
}

/// Stores the entries of `next` that differ from `previous`.
pub(crate) async fn store(
    client: &Client,
    target: &TableId,
    previous: &ColumnMap,
    next: &ColumnMap,
) -> Result<(), TargetError> {
    for (attnum, m) in next {
        if previous.get(attnum) == Some(m) {
            continue;
        }
        let seq = i64::try_from(m.since.seq).unwrap_or(i64::MAX);
        client
            .execute(
                "INSERT INTO bitclone9.source_columns AS s (target_schema, target_table, attnum, column_name, pg_type, dropped, since_lsn, since_streamed, since_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::numeric, $8, $9)
                 ON CONFLICT (target_schema, target_table, attnum) DO UPDATE SET
                   column_name = EXCLUDED.column_name, pg_type = EXCLUDED.pg_type, dropped = EXCLUDED.dropped,
                   since_lsn = EXCLUDED.since_lsn, since_streamed = EXCLUDED.since_streamed, since_seq = EXCLUDED.since_seq",
                &[&target.schema, &target.name, attnum, &m.column, &m.pg_type, &m.dropped, &m.since.lsn.to_string(), &m.since.streamed, &seq],
            )
            .await
            .map_err(|e| db_error("bitclone9.source_columns", e))?;
    }
    Ok(())
}

/// The target's type of `column`, as `format_type` prints it.
async fn column_type(
    client: &Client,
    target: &TableId,
    column: &str,
) -> Result<Option<String>, TargetError> {
    let row = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&target.schema, &target.name, &column],
        )
        .await
        .map_err(|e| db_error(&target.to_string(), e))?;
    Ok(row.map(|r| r.get(0)))
}

/// Runs the plan's DDL in the open transaction.
pub(crate) async fn apply_steps(
    client: &Client,
    target: &TableId,
    steps: &[Step],
) -> Result<(), TargetError> {
    let name = format!("{}.{}", ident(&target.schema), ident(&target.name));
    let shown = target.to_string();
    for step in steps {
        let sql = match step {
            Step::Rename { from, to } => format!(
                "ALTER TABLE {name} RENAME COLUMN {} TO {}",
                ident(from),
                ident(to)
            ),
            Step::Add { column, pg_type } => format!(
                "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {pg_type}",
                ident(column)
            ),
            Step::DropColumn { column } => {
                format!("ALTER TABLE {name} DROP COLUMN IF EXISTS {}", ident(column))
            }
            Step::KeepNullable { column } => format!(
                "ALTER TABLE {name} ALTER COLUMN {} DROP NOT NULL",
                ident(column)
            ),
            Step::Retype { column, from, to } => {
                if column_type(client, target, column).await?.as_deref() == Some(to.as_str()) {
                    continue;
                }
                let sql = format!(
                    "ALTER TABLE {name} ALTER COLUMN {0} TYPE {to} USING {0}::{to}",
                    ident(column)
                );
                client.batch_execute(&sql).await.map_err(|e| {
                    let why = e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string());
                    TargetError::SchemaChange {
                        table: shown.clone(),
                        detail: format!(
                            "the source changed column {column} from {from} to {to}, and the target cannot cast its values ({why}). Run in the target: ALTER TABLE {name} ALTER COLUMN {} TYPE {to} USING <an expression that converts {}>; the sink goes on by itself once the column has type {to}",
                            ident(column),
                            pg_literal(column)
                        ),
                    }
                })?;
                tracing::info!(table = %shown, column, from, to, "changed a column's type as the source did");
                continue;
            }
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error(&shown, e))?;
        tracing::info!(table = %shown, change = ?step, "followed a column change of the source");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitclone9_core::ColumnType;

    fn col(name: &str, attnum: i16, pg_type: &str) -> Column {
        Column {
            name: name.into(),
            ty: ColumnType::Text,
            pg_type: pg_type.into(),
            type_oid: 25,
            is_key: attnum == 1,
            attnum: Some(attnum),
        }
    }

    fn table(cols: Vec<Column>) -> TableSchema {
        TableSchema {
            id: TableId::new("public", "t"),
            relation_id: 1,
            columns: cols,
        }
    }

    fn at(lsn: u64) -> Watermark {
        Watermark {
            lsn,
            streamed: true,
            seq: 0,
            part: crate::Part::Event,
        }
    }

    fn seeded(t: &TableSchema, lsn: u64) -> ColumnMap {
        let names: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
        plan(t, at(lsn), &ColumnMap::new(), &names, ColumnDrop::Keep).map
    }

    #[test]
    fn a_rename_is_a_rename_and_older_events_write_to_the_new_name() {
        let v1 = table(vec![col("id", 1, "integer"), col("a", 2, "text")]);
        let v2 = table(vec![col("id", 1, "integer"), col("b", 2, "text")]);
        let map = seeded(&v1, 10);
        let names = vec!["id".to_string(), "a".to_string()];
        let p = plan(&v2, at(20), &map, &names, ColumnDrop::Keep);
        assert_eq!(
            p.steps,
            vec![Step::Rename {
                from: "a".into(),
                to: "b".into()
            }]
        );
        assert_eq!(p.map[&2].column, "b");
        // An event of the old shape, from before the rename, arrives afterwards.
        let names = vec!["id".to_string(), "b".to_string()];
        let old = plan(&v1, at(15), &p.map, &names, ColumnDrop::Keep);
        assert!(old.steps.is_empty(), "{:?}", old.steps);
        assert_eq!(old.written, vec![(0, "id".into()), (1, "b".into())]);
        let v = view(&v1, &old.written);
        assert_eq!(v.schema.columns[1].name, "b");
        assert_eq!(v.keep, Some(vec![0, 1]));
        // The current shape again: nothing to do, written as it is.
        let same = plan(&v2, at(30), &p.map, &names, ColumnDrop::Keep);
        assert!(same.steps.is_empty());
        assert!(view(&v2, &same.written).keep.is_none());
        assert_eq!(same.map, p.map);
    }

    #[test]
    fn swapped_names_go_through_temporary_names() {
        let v1 = table(vec![
            col("id", 1, "integer"),
            col("a", 2, "text"),
            col("b", 3, "text"),
        ]);
        let v2 = table(vec![
            col("id", 1, "integer"),
            col("b", 2, "text"),
            col("a", 3, "text"),
        ]);
        let map = seeded(&v1, 10);
        let names: Vec<String> = ["id", "a", "b"].map(String::from).to_vec();
        let p = plan(&v2, at(20), &map, &names, ColumnDrop::Keep);
        assert_eq!(p.steps.len(), 4, "{:?}", p.steps);
        assert!(
            matches!(&p.steps[0], Step::Rename { to, .. } if to.starts_with("bitclone9_renaming_"))
        );
        assert_eq!(p.map[&2].column, "b");
        assert_eq!(p.map[&3].column, "a");
    }

    #[test]
    fn a_dropped_column_is_kept_nullable_or_dropped_and_older_events_still_fill_it() {
        let v1 = table(vec![col("id", 1, "integer"), col("a", 2, "text")]);
        let v2 = table(vec![col("id", 1, "integer")]);
        let map = seeded(&v1, 10);
        let names = vec!["id".to_string(), "a".to_string()];
        let keep = plan(&v2, at(20), &map, &names, ColumnDrop::Keep);
        assert_eq!(keep.steps, vec![Step::KeepNullable { column: "a".into() }]);
        assert!(keep.map[&2].dropped);
        let old = plan(&v1, at(15), &keep.map, &names, ColumnDrop::Keep);
        assert!(old.steps.is_empty());
        assert_eq!(
            old.written.len(),
            2,
            "the kept column still takes older values"
        );
        let drop = plan(&v2, at(20), &map, &names, ColumnDrop::Drop);
        assert_eq!(drop.steps, vec![Step::DropColumn { column: "a".into() }]);
        let old = plan(
            &v1,
            at(15),
            &drop.map,
            &["id".to_string()],
            ColumnDrop::Drop,
        );
        assert_eq!(
            old.written,
            vec![(0, "id".into())],
            "a dropped column's values are not written"
        );
        // Dropped, then a new column of the same name: the kept one moves aside.
        let v3 = table(vec![col("id", 1, "integer"), col("a", 3, "bigint")]);
        let p = plan(&v3, at(30), &keep.map, &names, ColumnDrop::Keep);
        assert_eq!(
            p.steps,
            vec![
                Step::Rename {
                    from: "a".into(),
                    to: "a_dropped".into()
                },
                Step::Add {
                    column: "a".into(),
                    pg_type: "bigint".into()
                }
            ]
        );
        assert_eq!(p.map[&2].column, "a_dropped");
    }

    #[test]
    fn a_type_change_is_applied_only_for_a_newer_shape() {
        let v1 = table(vec![col("id", 1, "integer"), col("n", 2, "integer")]);
        let v2 = table(vec![col("id", 1, "integer"), col("n", 2, "bigint")]);
        let map = seeded(&v1, 10);
        let names = vec!["id".to_string(), "n".to_string()];
        let p = plan(&v2, at(20), &map, &names, ColumnDrop::Keep);
        assert_eq!(
            p.steps,
            vec![Step::Retype {
                column: "n".into(),
                from: "integer".into(),
                to: "bigint".into()
            }]
        );
        let old = plan(&v1, at(15), &p.map, &names, ColumnDrop::Keep);
        assert!(
            old.steps.is_empty(),
            "an older event does not change the type back"
        );
        assert_eq!(old.map, p.map);
    }
}
