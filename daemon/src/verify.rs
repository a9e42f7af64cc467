//! `bitclone9 verify`: compares each table a sink clones with its source, in key ranges.
//!
//! The source's key order is cut into ranges of `chunk_rows` rows. For each range both databases
//! return a row count and a sum of 64-bit hashes of the rows' text forms, so a table of any size
//! is compared without loading it. The source may be changing: ranges that differ are compared
//! again, up to `rounds` times, and only ranges that never agreed are reported.

use bitclone9_core::TableId;
use bitclone9_postgres_sink::ident;
use bitclone9_postgres_source::{connect_session, PgEndpoint};
use std::time::Duration;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{which}: {detail}")]
    Db { which: String, detail: String },
}

fn db(which: &str) -> impl Fn(tokio_postgres::Error) -> VerifyError + '_ {
    move |e| VerifyError::Db {
        which: which.to_string(),
        detail: e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// How to compare.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    pub chunk_rows: i64,
    pub rounds: u32,
    pub interval: Duration,
}

/// A range end: the key values as text, `None` for an open end.
type Bound = Option<Vec<String>>;

/// One key range that differs: `[from, to)` in key order (`None`: open end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDiff {
    pub from: Bound,
    pub to: Bound,
    pub source_rows: i64,
    pub target_rows: i64,
}

/// The comparison of one table.
#[derive(Debug, Clone)]
pub struct TableReport {
    pub source: TableId,
    pub target: TableId,
    pub key: Vec<String>,
    pub source_rows: i64,
    pub ranges: usize,
    /// Rounds it took until every range agreed (1 = first comparison).
    pub rounds_used: u32,
    pub differing: Vec<RangeDiff>,
    /// Why the table could not be compared (e.g. missing in the target).
    pub problem: Option<String>,
}

impl TableReport {
    pub fn equal(&self) -> bool {
        self.problem.is_none() && self.differing.is_empty()
    }

    /// A range as `(k1, k2) >= (a, b) AND (k1, k2) < (c, d)`.
    pub fn describe(&self, d: &RangeDiff) -> String {
        let cols = format!("({})", self.key.join(", "));
        let vals = |v: &Vec<String>| format!("({})", v.join(", "));
        match (&d.from, &d.to) {
            (Some(f), Some(t)) => format!("{cols} >= {} AND {cols} < {}", vals(f), vals(t)),
            (Some(f), None) => format!("{cols} >= {}", vals(f)),
            (None, Some(t)) => format!("{cols} < {}", vals(t)),
            (None, None) => "all rows".to_string(),
        }
    }
}

struct TableSql {
    name: String,
    /// `ROW(k1, ...)` and the typed placeholders for a bound.
    key_row: String,
    key_types: Vec<String>,
    row_hash: String,
}

impl TableSql {
    fn bound(&self, first_param: usize) -> String {
        let parts: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first_param + i))
            .collect();
        format!("ROW({})", parts.join(", "))
    }

    fn range_query(&self, lower: bool, upper: bool) -> String {
        let mut conds = Vec::new();
        let n = self.key_types.len();
        if lower {
            conds.push(format!("{} >= {}", self.key_row, self.bound(1)));
        }
        if upper {
            let first = if lower { n + 1 } else { 1 };
            conds.push(format!("{} < {}", self.key_row, self.bound(first)));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        format!(
            "SELECT count(*), coalesce(sum(hashtextextended({}, 0)::numeric), 0)::text FROM {}{filter}",
            self.row_hash, self.name
        )
    }
}

async fn session(ep: &PgEndpoint, what: &str) -> Result<Client, VerifyError> {
    connect_session(ep, "bitclone9-verify")
        .await
        .map_err(|e| VerifyError::Db {
            which: what.to_string(),
            detail: e.to_string(),
        })
}

/// Compares `tables` (source name → target name) between the two databases.
pub async fn verify(
    source: &PgEndpoint,
    target: &PgEndpoint,
    tables: &[(TableId, TableId)],
    opts: VerifyOptions,
) -> Result<Vec<TableReport>, VerifyError> {
    let src = session(source, "source").await?;
    let dst = session(target, "target").await?;
    let mut reports = Vec::new();
    for (s, t) in tables {
        reports.push(verify_table(&src, &dst, s, t, opts).await?);
    }
    Ok(reports)
}

async fn verify_table(
    src: &Client,
    dst: &Client,
    s: &TableId,
    t: &TableId,
    opts: VerifyOptions,
) -> Result<TableReport, VerifyError> {
    let qualified = |t: &TableId| format!("{}.{}", ident(&t.schema), ident(&t.name));
    let mut report = TableReport {
        source: s.clone(),
        target: t.clone(),
        key: Vec::new(),
        source_rows: 0,
        ranges: 0,
        rounds_used: 1,
        differing: Vec::new(),
        problem: None,
    };
    // Columns (as captured: stored generated columns are not) and key, from the source.
    let cols = src
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.attnum = ANY(coalesce((SELECT i.indkey::int2[] FROM pg_index i
                        WHERE i.indrelid = c.oid AND (i.indisreplident OR i.indisprimary)
                        ORDER BY i.indisreplident DESC LIMIT 1), '{}'::int2[]))
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0
                AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&s.schema, &s.name],
        )
        .await
        .map_err(db("source"))?;
    let columns: Vec<(String, String, bool)> = cols
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if columns.is_empty() {
        report.problem = Some("not found in the source".into());
        return Ok(report);
    }
    let key: Vec<&(String, String, bool)> = columns.iter().filter(|c| c.2).collect();
    if key.is_empty() {
        report.problem = Some("has no primary key or replica identity index to order by".into());
        return Ok(report);
    }
    report.key = key.iter().map(|c| c.0.clone()).collect();
    let exists: bool = dst
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified(t)])
        .await
        .map_err(db("target"))?
        .get(0);
    if !exists {
        report.problem = Some("missing in the target".into());
        return Ok(report);
    }
    let key_row = format!(
        "ROW({})",
        key.iter()
            .map(|c| ident(&c.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row_hash = format!(
        "ROW({})::text",
        columns
            .iter()
            .map(|c| ident(&c.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let sql_for = |t: &TableId| TableSql {
        name: qualified(t),
        key_row: key_row.clone(),
        key_types: key.iter().map(|c| c.1.clone()).collect(),
        row_hash: row_hash.clone(),
    };
    let (src_sql, dst_sql) = (sql_for(s), sql_for(t));
    // Range starts: every chunk_rows-th key of the source, in key order. The outer query
    // orders by the row number: its output columns are the keys' text forms, which an ORDER BY
    // of the key names would sort as text (999 after 1000).
    let key_text = key
        .iter()
        .map(|c| format!("{}::text", ident(&c.0)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = key
        .iter()
        .map(|c| ident(&c.0))
        .collect::<Vec<_>>()
        .join(", ");
    let starts = src
        .query(
            &format!(
                "SELECT {key_text} FROM (SELECT {order}, row_number() OVER (ORDER BY {order}) AS bitclone9_rn FROM {}) s
                  WHERE (bitclone9_rn - 1) % $1 = 0 AND bitclone9_rn > 1 ORDER BY bitclone9_rn",
                src_sql.name
            ),
            &[&opts.chunk_rows],
        )
        .await
        .map_err(db("source"))?;
    let bounds: Vec<Vec<String>> = starts
        .iter()
        .map(|r| (0..key.len()).map(|i| r.get::<_, String>(i)).collect())
        .collect();
    // Ranges: (-inf, b0), [b0, b1), ..., [bn, +inf).
    let mut ranges: Vec<(Bound, Bound)> = Vec::new();
    let mut prev: Option<Vec<String>> = None;
    for b in &bounds {
        ranges.push((prev.clone(), Some(b.clone())));
        prev = Some(b.clone());
    }
    ranges.push((prev, None));
    report.ranges = ranges.len();

    let mut pending: Vec<usize> = (0..ranges.len()).collect();
    let mut last: Vec<RangeDiff> = Vec::new();
    for round in 1..=opts.rounds.max(1) {
        if round > 1 {
            tokio::time::sleep(opts.interval).await;
        }
        let mut still = Vec::new();
        last.clear();
        for &i in &pending {
            let (from, to) = &ranges[i];
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
            for v in from.iter().chain(to.iter()).flatten() {
                params.push(v);
            }
            let (qa, qb) = (
                src_sql.range_query(from.is_some(), to.is_some()),
                dst_sql.range_query(from.is_some(), to.is_some()),
            );
            let (a, b) = tokio::join!(src.query_one(&qa, &params), dst.query_one(&qb, &params));
            let (a, b) = (a.map_err(db("source"))?, b.map_err(db("target"))?);
            let (sa, sb): (i64, i64) = (a.get(0), b.get(0));
            let (ha, hb): (String, String) = (a.get(1), b.get(1));
            if round == 1 {
                report.source_rows += sa;
            }
            if sa != sb || ha != hb {
                still.push(i);
                last.push(RangeDiff {
                    from: from.clone(),
                    to: to.clone(),
                    source_rows: sa,
                    target_rows: sb,
                });
            }
        }
        pending = still;
        report.rounds_used = round;
        if pending.is_empty() {
            break;
        }
    }
    report.differing = last;
    Ok(report)
}
