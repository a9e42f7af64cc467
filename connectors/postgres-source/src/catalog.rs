//! What the source asks PostgreSQL's catalog: server settings, the tables to capture, their
//! columns and key, type details, the publication and the slot.

use crate::types::{self, PgType};
use crate::SourceError;
use bitclone9_core::{Column, Lsn, TableId, TableSchema};
use std::collections::HashMap;
use tokio_postgres::Client;

/// Runs a catalog query, naming what it was for when it fails.
fn q(what: &'static str) -> impl Fn(tokio_postgres::Error) -> SourceError {
    move |e| SourceError::from_postgres(what, e)
}

/// Refuses a server that cannot do logical replication for this role, saying how to fix it.
pub async fn check_server(client: &Client, user: &str) -> Result<(), SourceError> {
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("reading wal_level"))?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(SourceError::Misconfigured {
            problem: format!("wal_level is '{wal_level}', logical decoding needs 'logical'"),
            fix: "run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into(),
        });
    }
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q("reading the role's privileges"))?;
    if !row.get::<_, bool>(0) {
        return Err(SourceError::Misconfigured {
            problem: format!("role '{user}' may not use replication"),
            fix: format!("run ALTER ROLE \"{user}\" REPLICATION; as a superuser"),
        });
    }
    Ok(())
}

/// Glob match with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The tables that `include` and not `exclude` match (patterns like `public.*`), split by
/// whether their updates and deletes can be captured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Tables with a primary key, a replica identity index or REPLICA IDENTITY FULL.
    pub tables: Vec<TableId>,
    /// Tables without any (DEFAULT without a primary key, or NOTHING): once published, the
    /// server refuses their own UPDATEs and DELETEs, so they are never published as they are.
    pub without_identity: Vec<TableId>,
}

impl Selection {
    /// The warning that names a table left out, and its fixes.
    pub fn left_out_warning(table: &TableId) -> String {
        format!(
            "table {table} is left out: it has no primary key or replica identity, so publishing it would make the server refuse its UPDATEs and DELETEs; to capture it, add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL, or set replica_identity_full = true for this source",
            quote_table(table)
        )
    }
}

/// The tables matched by `include` and not by `exclude`, with their replica identity checked.
pub async fn select_tables(
    client: &Client,
    include: &[String],
    exclude: &[String],
) -> Result<Selection, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                            AND (i.indisprimary OR i.indisreplident))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(q("listing tables"))?;
    let mut selection = Selection::default();
    for row in rows {
        let id = TableId::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let full = id.to_string();
        if !include.iter().any(|p| glob_match(p, &full))
            || exclude.iter().any(|p| glob_match(p, &full))
        {
            continue;
        }
        let replident: String = row.get(2);
        let has_identity_index: bool = row.get(3);
        if replident == "n" || (replident != "f" && !has_identity_index) {
            selection.without_identity.push(id);
        } else {
            selection.tables.push(id);
        }
    }
    if selection.tables.is_empty() && selection.without_identity.is_empty() {
        return Err(SourceError::Misconfigured {
            problem: format!("no table matches include {include:?} (exclude {exclude:?})"),
            fix: "check the patterns: they are schema.table with * and ? wildcards".into(),
        });
    }
    Ok(selection)
}

/// Sets REPLICA IDENTITY FULL on `table` (the opt-in `replica_identity_full`).
pub async fn set_identity_full(client: &Client, table: &TableId) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            quote_table(table)
        ))
        .await
        .map_err(|e| SourceError::Misconfigured {
            problem: format!(
                "cannot set REPLICA IDENTITY FULL on {table} (replica_identity_full = true): {}",
                e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
            ),
            fix: format!(
                "run ALTER TABLE {} REPLICA IDENTITY FULL as the table's owner, or give it a primary key",
                quote_table(table)
            ),
        })
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_table(t: &TableId) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Creates the publication for `tables` when it does not exist; returns the tables it publishes.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[TableId],
) -> Result<Vec<TableId>, SourceError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(q("looking up the publication"))?
        .is_some();
    if !exists {
        let list: Vec<String> = tables.iter().map(quote_table).collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(name),
            list.join(", ")
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(q("creating the publication"))?;
        tracing::info!(
            publication = name,
            tables = tables.len(),
            "created publication"
        );
    }
    published_tables(client, name).await
}

/// The tables of the publication.
pub async fn published_tables(client: &Client, name: &str) -> Result<Vec<TableId>, SourceError> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(q("listing the publication's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Whether a table of this name exists.
pub async fn table_exists(client: &Client, table: &TableId) -> Result<bool, SourceError> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_table(table)])
        .await
        .map_err(q("looking for a table"))?
        .get(0))
}

/// Which of the relation OIDs `oids` still exist.
pub async fn existing_relations(client: &Client, oids: &[u32]) -> Result<Vec<u32>, SourceError> {
    let rows = client
        .query(
            "SELECT oid FROM pg_class WHERE oid = ANY($1::oid[])",
            &[&oids],
        )
        .await
        .map_err(q("looking for dropped tables"))?;
    Ok(rows.iter().map(|r| r.get::<_, u32>(0)).collect())
}

/// Every live, non-generated column of the publication's tables: the table, the column's
/// number and name, and whether it has a default or identity (see [`CatalogColumn::filled`]).
pub async fn published_columns(
    client: &Client,
    publication: &str,
) -> Result<Vec<(TableId, i16, String, bool)>, SourceError> {
    let rows = client
        .query(
            "SELECT pt.schemaname::text, pt.tablename::text, a.attnum, a.attname::text,
                    a.atthasmissing OR a.atthasdef OR a.attidentity <> ''
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             JOIN pg_attribute a ON a.attrelid = c.oid
             WHERE pt.pubname = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY 1, 2, 3",
            &[&publication],
        )
        .await
        .map_err(q("reading the publication's columns"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
                r.get(3),
                r.get(4),
            )
        })
        .collect())
}

/// Installs (once per database) the event trigger that writes a transactional logical message
/// with prefix [`crate::DDL_PREFIX`] into each transaction that creates, drops or alters a
/// table, so that the source checks its catalog as soon as that transaction arrives.
pub async fn install_ddl_trigger(client: &Client, database: &str) -> Result<(), SourceError> {
    let installed: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'bitclone9_ddl')",
            &[],
        )
        .await
        .map_err(q("looking for the DDL trigger"))?
        .get(0);
    if installed {
        return Ok(());
    }
    let sql = format!(
        "CREATE OR REPLACE FUNCTION public.bitclone9_ddl_note() RETURNS event_trigger
           LANGUAGE plpgsql AS $f$
           BEGIN PERFORM pg_logical_emit_message(true, '{prefix}', tg_tag); END $f$;
         CREATE EVENT TRIGGER bitclone9_ddl ON ddl_command_end
           WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'DROP TABLE', 'ALTER TABLE')
           EXECUTE FUNCTION public.bitclone9_ddl_note()",
        prefix = crate::DDL_PREFIX
    );
    client.batch_execute(&sql).await.map_err(|e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            SourceError::Misconfigured {
                problem: format!(
                    "ddl_trigger = true, but the role may not create event triggers in database {database}"
                ),
                fix: "create it once as a superuser (README.md, `ddl_trigger`, has the SQL), or set ddl_trigger = false (new tables are then found by new_table_check_interval)".into(),
            }
        } else {
            SourceError::from_postgres("installing the DDL trigger", e)
        }
    })?;
    tracing::info!(
        database,
        "installed event trigger bitclone9_ddl: table changes are noted in the WAL"
    );
    Ok(())
}

/// What [`alter_publication`] does with its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationChange {
    Add,
    Drop,
}

/// Adds `tables` to the publication, or removes them from it.
pub async fn alter_publication(
    client: &Client,
    name: &str,
    change: PublicationChange,
    tables: &[TableId],
) -> Result<(), SourceError> {
    let (verb, what) = match change {
        PublicationChange::Add => ("ADD", "adding new tables to the publication"),
        PublicationChange::Drop => ("DROP", "removing tables from the publication"),
    };
    let list: Vec<String> = tables.iter().map(quote_table).collect();
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} {verb} TABLE {}",
            quote_ident(name),
            list.join(", ")
        ))
        .await
        .map_err(q(what))
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    /// WAL the slot keeps: `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: Option<i64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, wal_status,
                    restart_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(q("looking up the replication slot"))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: r.get(4),
        restart_lsn: r.get::<_, Option<String>>(5).and_then(|s| s.parse().ok()),
        retained_bytes: r.get(6),
    }))
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(q("dropping the replication slot"))?;
    Ok(())
}

/// Describes columns from their type OIDs and modifiers, fetching the catalog rows of types that
/// are not built in (and caching them in `known`).
pub async fn describe_columns(
    client: &Client,
    known: &mut HashMap<u32, PgType>,
    columns: &[(String, u32, i32)],
    key: &[String],
    attnums: &HashMap<String, i16>,
) -> Result<Vec<Column>, SourceError> {
    // Domains and arrays may need a second round (their base or element type).
    for _ in 0..4 {
        let missing: Vec<u32> = columns
            .iter()
            .filter_map(|(_, oid, _)| types::needs_lookup(*oid, known))
            .collect();
        if missing.is_empty() {
            break;
        }
        let rows = client
            .query(
                "SELECT oid, typtype::text, typcategory::text, typelem, typbasetype, typtypmod
                 FROM pg_type WHERE oid = ANY($1)",
                &[&missing],
            )
            .await
            .map_err(q("reading column types"))?;
        for r in rows {
            let oid: u32 = r.get(0);
            let byte = |i: usize| r.get::<_, String>(i).bytes().next().unwrap_or(b'?');
            known.insert(
                oid,
                PgType {
                    oid,
                    kind: byte(1),
                    category: byte(2),
                    elem: r.get(3),
                    base: r.get(4),
                    base_typmod: r.get(5),
                },
            );
        }
        // Unknown OIDs (dropped types) must not loop forever.
        for oid in missing {
            known.entry(oid).or_insert(PgType {
                oid,
                kind: b'?',
                category: b'?',
                elem: 0,
                base: 0,
                base_typmod: -1,
            });
        }
    }
    let oids: Vec<u32> = columns.iter().map(|c| c.1).collect();
    let mods: Vec<i32> = columns.iter().map(|c| c.2).collect();
    let names = client
        .query(
            "SELECT format_type(t.oid, NULLIF(t.m, -1)) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, m, n) ORDER BY n",
            &[&oids, &mods],
        )
        .await
        .map_err(q("formatting column types"))?;
    Ok(columns
        .iter()
        .zip(names)
        .map(|((name, oid, typmod), pg_type)| Column {
            name: name.clone(),
            ty: types::column_type(*oid, *typmod, known),
            pg_type: pg_type.get(0),
            type_oid: *oid,
            is_key: key.contains(name),
            attnum: attnums.get(name).copied(),
        })
        .collect())
}

/// One column of the catalog, as [`infer_attnums`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    pub attnum: i16,
    /// Dropped or generated: never in a Relation message, but a number it may stand between.
    pub hidden: bool,
    /// Has a default or is an identity: when it was added, PostgreSQL gave every existing row
    /// a value (stored as the column's missing value, or by rewriting the table) without a
    /// row change in the WAL.
    pub filled: bool,
}

/// Every column number of a table (live, dropped and generated), in order.
pub async fn catalog_columns(
    client: &Client,
    relation_id: u32,
) -> Result<Vec<CatalogColumn>, SourceError> {
    let rows = client
        .query(
            "SELECT attname::text, attnum, attisdropped OR attgenerated <> '',
                    NOT attisdropped AND (atthasmissing OR atthasdef OR attidentity <> '')
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 ORDER BY attnum",
            &[&relation_id],
        )
        .await
        .map_err(q("reading the table's column numbers"))?;
    Ok(rows
        .iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            attnum: r.get(1),
            hidden: r.get(2),
            filled: r.get(3),
        })
        .collect())
}

/// The column numbers of a Relation message's columns (in attnum order, as pgoutput sends
/// them), from a catalog that may be older or newer than the message: a column is found by
/// its name, else by its place between columns found by name, when exactly one catalog
/// column (of any kind) sits in that place for exactly one unfound message column. Anything
/// else stays unknown (`None`): a sink then follows that column by name.
pub fn infer_attnums(message: &[String], catalog: &[CatalogColumn]) -> Vec<Option<i16>> {
    let mut out: Vec<Option<i16>> = message
        .iter()
        .map(|n| {
            catalog
                .iter()
                .find(|c| !c.hidden && c.name == *n)
                .map(|c| c.attnum)
        })
        .collect();
    // Found numbers must rise with the message's order; names found out of order (a name
    // reused by another column since) are not trusted, neither of a pair.
    let found = out.clone();
    for (i, v) in out.iter_mut().enumerate() {
        let Some(n) = found[i] else { continue };
        let inverted = found
            .iter()
            .enumerate()
            .any(|(j, o)| o.is_some_and(|m| (j < i && m >= n) || (j > i && m <= n)));
        if inverted {
            *v = None;
        }
    }
    let taken: Vec<i16> = out.iter().flatten().copied().collect();
    let mut i = 0;
    while i < out.len() {
        if out[i].is_some() {
            i += 1;
            continue;
        }
        let start = i;
        while i < out.len() && out[i].is_none() {
            i += 1;
        }
        let low = if start == 0 {
            0
        } else {
            out[start - 1].unwrap_or(0)
        };
        let high = out.get(i).copied().flatten().unwrap_or(i16::MAX);
        let between: Vec<&CatalogColumn> = catalog
            .iter()
            .filter(|c| c.attnum > low && c.attnum < high && !taken.contains(&c.attnum))
            .collect();
        if i - start == 1 && between.len() == 1 && !between[0].hidden {
            out[start] = Some(between[0].attnum);
        }
    }
    out
}

/// The key columns of a table: its replica identity index when it has one (deletes carry exactly
/// those columns), else its primary key.
pub async fn key_columns(client: &Client, relation_id: u32) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1 AND i.indexrelid = (
               SELECT indexrelid FROM pg_index WHERE indrelid = $1 AND (indisprimary OR indisreplident)
               ORDER BY indisreplident DESC, indisprimary DESC LIMIT 1)",
            &[&relation_id],
        )
        .await
        .map_err(q("reading the table's key"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A table's schema read from the catalog (used by the snapshot, inside its transaction).
pub async fn table_schema(
    client: &Client,
    known: &mut HashMap<u32, PgType>,
    table: &TableId,
) -> Result<TableSchema, SourceError> {
    let relation_id: u32 = client
        .query_one(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(q("finding the table"))?
        .get(0);
    let rows = client
        .query(
            "SELECT attname::text, atttypid, atttypmod FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&relation_id],
        )
        .await
        .map_err(q("reading the table's columns"))?;
    let cols: Vec<(String, u32, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let key = key_columns(client, relation_id).await?;
    let attnums: HashMap<String, i16> = catalog_columns(client, relation_id)
        .await?
        .into_iter()
        .filter(|c| !c.hidden)
        .map(|c| (c.name, c.attnum))
        .collect();
    Ok(TableSchema {
        id: table.clone(),
        relation_id,
        columns: describe_columns(client, known, &cols, &key, &attnums).await?,
    })
}

#[cfg(test)]
mod attnum_tests {
    use super::*;

    fn cat(cols: &[(&str, i16, bool)]) -> Vec<CatalogColumn> {
        cols.iter()
            .map(|(n, a, h)| CatalogColumn {
                name: n.to_string(),
                attnum: *a,
                hidden: *h,
                filled: false,
            })
            .collect()
    }
    fn msg(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_catalog_ahead_or_behind_a_rename_still_numbers_the_column() {
        // The catalog already has the new name; the message the old one (or the reverse).
        let c = cat(&[
            ("o", 1, false),
            ("n", 2, false),
            ("v", 3, false),
            ("quantity", 4, false),
        ]);
        assert_eq!(
            infer_attnums(&msg(&["o", "n", "v", "qty"]), &c),
            vec![Some(1), Some(2), Some(3), Some(4)]
        );
        let c = cat(&[
            ("id", 1, false),
            ("a", 2, false),
            ("n", 3, false),
            ("gone", 4, false),
            ("big", 5, false),
        ]);
        assert_eq!(
            infer_attnums(&msg(&["id", "a2", "n", "big"]), &c),
            vec![Some(1), Some(2), Some(3), Some(5)]
        );
    }

    #[test]
    fn an_ambiguous_place_stays_unknown() {
        // b (2) was dropped and c (3) added since: which is b is unknowable.
        let c = cat(&[
            ("a", 1, false),
            ("........pg.dropped.2........", 2, true),
            ("c", 3, false),
        ]);
        assert_eq!(infer_attnums(&msg(&["a", "b"]), &c), vec![Some(1), None]);
        // Two unfound columns in one place.
        let c = cat(&[("a", 1, false), ("x", 2, false), ("y", 3, false)]);
        assert_eq!(
            infer_attnums(&msg(&["a", "p", "q"]), &c),
            vec![Some(1), None, None]
        );
        // The only column in the place was dropped since: unknown, not the dropped number.
        let c = cat(&[("a", 1, false), ("........pg.dropped.2........", 2, true)]);
        assert_eq!(infer_attnums(&msg(&["a", "gone"]), &c), vec![Some(1), None]);
    }

    #[test]
    fn a_name_now_held_by_a_later_column_is_not_trusted() {
        // a (1) renamed to z, then a new column named a (3): the message still says a, b.
        // Neither of the pair found out of order is trusted (a sink follows them by name).
        let c = cat(&[("z", 1, false), ("b", 2, false), ("a", 3, false)]);
        assert_eq!(infer_attnums(&msg(&["a", "b"]), &c), vec![None, None]);
        let c = cat(&[
            ("z", 1, false),
            ("b", 2, false),
            ("c", 3, false),
            ("a", 4, false),
        ]);
        assert_eq!(
            infer_attnums(&msg(&["a", "b", "c"]), &c),
            vec![None, None, None],
            "a found at 4 conflicts with b and c"
        );
    }
}
