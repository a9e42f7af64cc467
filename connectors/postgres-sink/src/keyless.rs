//! Tables without a key: their changes are applied in order, one row at a time, by matching
//! all columns (the source sends the whole old row under REPLICA IDENTITY FULL).
//!
//! ```text
//!  [Change] (one partition, commit order)
//!     ├─ inserts / snapshot rows, back to back ──► one COPY into the table
//!     ├─ update ──► UPDATE one row whose columns all equal the old row's
//!     └─ delete ──► DELETE one row whose columns all equal the old row's
//! ```
//!
//! Rows are compared by their text forms, both rendered by the target session (so types
//! without an equality operator, such as json or point, compare too), and one matching row is
//! changed even when there are several identical ones: exactly what the source did. Nothing is
//! collapsed, so a batch is applied as the source wrote it; idempotence comes, as for every
//! table, from the sink's positions, which skip whatever the target already holds.

use crate::{db_error, ident, text, TargetError};
use bitclone9_core::{Change, Op, TableSchema, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// The statements of one keyless table shape.
#[derive(Debug)]
pub(crate) struct KeylessSql {
    copy: String,
    update_one: String,
    delete_one: String,
}

impl KeylessSql {
    pub(crate) fn new(name: &str, table: &TableSchema) -> Self {
        let cols: Vec<String> = table.columns.iter().map(|c| ident(&c.name)).collect();
        let n = cols.len();
        // $1..$n: the old row's values as text.
        let matches = table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "t.{}::text IS NOT DISTINCT FROM (${}::text::{})::text",
                    ident(&c.name),
                    i + 1,
                    c.pg_type
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let one_row = format!(
            "(tableoid, ctid) = (SELECT t.tableoid, t.ctid FROM {name} AS t WHERE {matches} LIMIT 1)"
        );
        // $n+1..$2n: the new row's values.
        let set = table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ${}::text::{}", ident(&c.name), n + i + 1, c.pg_type))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            copy: format!("COPY {name} ({}) FROM STDIN", cols.join(", ")),
            update_one: format!("UPDATE {name} SET {set} WHERE {one_row}"),
            delete_one: format!("DELETE FROM {name} WHERE {one_row}"),
        }
    }
}

/// Counts of one keyless apply.
#[derive(Debug, Default)]
pub(crate) struct KeylessStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Updates and deletes that found no matching row.
    pub missing: u64,
}

/// The text forms of `row`'s values (`None` for NULL); unchanged TOAST values are taken from
/// `fallback` (the old row, complete under REPLICA IDENTITY FULL).
fn texts(
    table: &TableSchema,
    row: &[Value],
    fallback: Option<&[Value]>,
    bad: &dyn Fn(String) -> TargetError,
) -> Result<Vec<Option<String>>, TargetError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, (v, c)) in row.iter().zip(&table.columns).enumerate() {
        let v = match v {
            Value::UnchangedToast => match fallback.map(|f| &f[i]) {
                Some(f) if !matches!(f, Value::UnchangedToast) => f,
                _ => {
                    return Err(bad(format!(
                        "column {} of a row without a key was left unchanged (TOAST) and the old row does not carry it: set REPLICA IDENTITY FULL on the source table",
                        c.name
                    )))
                }
            },
            v => v,
        };
        if matches!(v, Value::Null) {
            out.push(None);
            continue;
        }
        let mut s = String::new();
        text::pg_text(&mut s, v, &c.ty).map_err(|e| bad(format!("column {}: {e}", c.name)))?;
        out.push(Some(s));
    }
    Ok(out)
}

/// Runs `text` (prepared on first use into `stmt`, with `params.len()` text parameters) and
/// tells whether it changed a row.
async fn change_one(
    client: &Client,
    stmt: &mut Option<tokio_postgres::Statement>,
    text: &str,
    params: &[Option<String>],
    target: &str,
) -> Result<bool, TargetError> {
    let prepared = match stmt {
        Some(s) => s,
        None => stmt.insert(
            client
                .prepare_typed(text, &vec![Type::TEXT; params.len()])
                .await
                .map_err(|e| db_error(target, e))?,
        ),
    };
    let n = client
        .execute_raw(prepared, params.iter().map(|p| p.as_deref()))
        .await
        .map_err(|e| db_error(target, e))?;
    Ok(n > 0)
}

/// Applies `changes` of one keyless table, in order, inside the open transaction.
pub(crate) async fn apply(
    client: &Client,
    sql: &KeylessSql,
    table: &TableSchema,
    changes: &[&Change],
    target: &str,
) -> Result<KeylessStats, TargetError> {
    let bad = |detail: String| TargetError::Refused {
        table: target.to_string(),
        sqlstate: "22000".into(),
        detail,
    };
    let mut stats = KeylessStats::default();
    let (mut update, mut delete) = (None, None);
    let mut copy = String::new();
    let mut copied = 0u64;
    for c in changes {
        if !matches!(c.op, Op::Insert | Op::Read) && copied > 0 {
            crate::copy_in(client, &sql.copy, std::mem::take(&mut copy), target).await?;
            stats.inserts += copied;
            copied = 0;
        }
        let old_row = || {
            c.before.as_deref().ok_or_else(|| {
                bad(format!(
                    "{} event of a table without a key carries no old row: set REPLICA IDENTITY FULL on the source table",
                    c.op.code()
                ))
            })
        };
        match c.op {
            Op::Insert | Op::Read => {
                let after = c
                    .after
                    .as_ref()
                    .ok_or_else(|| bad(format!("{} event without a new row", c.op.code())))?;
                for (i, (v, col)) in after.iter().zip(&table.columns).enumerate() {
                    if i > 0 {
                        copy.push('\t');
                    }
                    text::copy_field(&mut copy, v, &col.ty)
                        .map_err(|e| bad(format!("column {}: {e}", col.name)))?;
                }
                copy.push('\n');
                copied += 1;
            }
            Op::Update => {
                let before = old_row()?;
                let after = c
                    .after
                    .as_ref()
                    .ok_or_else(|| bad("u event without a new row".into()))?;
                let mut params = texts(table, before, None, &bad)?;
                params.extend(texts(table, after, Some(before), &bad)?);
                let changed =
                    change_one(client, &mut update, &sql.update_one, &params, target).await?;
                stats.updates += 1;
                stats.missing += u64::from(!changed);
            }
            Op::Delete => {
                let params = texts(table, old_row()?, None, &bad)?;
                let changed =
                    change_one(client, &mut delete, &sql.delete_one, &params, target).await?;
                stats.deletes += 1;
                stats.missing += u64::from(!changed);
            }
            Op::Truncate => {}
        }
    }
    if copied > 0 {
        crate::copy_in(client, &sql.copy, copy, target).await?;
        stats.inserts += copied;
    }
    Ok(stats)
}
