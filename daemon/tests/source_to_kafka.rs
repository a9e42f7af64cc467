//! End-to-end tests of PostgreSQL → Kafka against the real local stack (scripts/stack up).
//! Each test has its own database, slot, topics and state directory.

mod common;

use apache_avro::types::Value as Avro;
use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn uuid(s: &str) -> Avro {
    Avro::Uuid(s.parse().expect("valid uuid"))
}

fn dec(bytes: &[u8]) -> Avro {
    Avro::Decimal(bytes.to_vec().into())
}

fn some(v: Avro) -> Avro {
    Avro::Union(1, Box::new(v))
}

fn none() -> Avro {
    Avro::Union(0, Box::new(Avro::Null))
}

const ALL_TYPES_DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE all_types (
  id bigint PRIMARY KEY,
  i2 smallint, i4 integer, dom posint,
  num numeric(12,3), f4 real, f8 double precision, b boolean,
  t text, vc varchar(20), ch char(3), by bytea,
  dt date, tm time, ts timestamp, tz timestamptz,
  u uuid, j json, jb jsonb, m mood,
  ai integer[], at text[], am mood[],
  iv interval, nul text
);
"#;

const ALL_TYPES_VALUES: &str = r#"(-7, 123456, 5, 12345.678, 1.5, -2.5e10, true,
  E'h\u00e9 "q"\ttab\nline', 'varchar', 'ab', '\x00ff',
  '2024-02-29', '13:14:15.5', '2024-02-29 12:30:45.123456', '2024-02-29 12:30:45.123456+02',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": 1}', '{"b": [1, 2]}', 'happy',
  '{1,NULL,3}', '{"a b","c,d"}', '{sad,happy}', '1 day 02:00:00', NULL)"#;

/// ALL_TYPES_VALUES with `id` in front.
fn all_types_row(id: i64) -> String {
    format!("({id}, {}", &ALL_TYPES_VALUES[1..])
}

/// The decoded `after` row expected for ALL_TYPES_VALUES with key `id`.
fn expected_all_types(id: i64) -> HashMap<String, Avro> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: Avro| {
        m.insert(k.to_string(), v);
    };
    put("id", Avro::Long(id));
    put("i2", Avro::Int(-7));
    put("i4", Avro::Int(123456));
    put("dom", Avro::Int(5));
    put("num", dec(&[0x00, 0xBC, 0x61, 0x4E]));
    put("f4", Avro::Float(1.5));
    put("f8", Avro::Double(-2.5e10));
    put("b", Avro::Boolean(true));
    put("t", Avro::String("hé \"q\"\ttab\nline".into()));
    put("vc", Avro::String("varchar".into()));
    put("ch", Avro::String("ab ".into()));
    put("by", Avro::Bytes(vec![0, 255]));
    put("dt", Avro::Date(19782));
    put("tm", Avro::TimeMicros(47_655_500_000));
    put("ts", Avro::LocalTimestampMicros(1_709_209_845_123_456));
    put("tz", Avro::TimestampMicros(1_709_202_645_123_456));
    put("u", uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    put("j", Avro::String("{\"a\": 1}".into()));
    put("jb", Avro::String("{\"b\": [1, 2]}".into()));
    put("m", Avro::String("happy".into()));
    put(
        "ai",
        Avro::Array(vec![some(Avro::Int(1)), none(), some(Avro::Int(3))]),
    );
    put(
        "at",
        Avro::Array(vec![
            some(Avro::String("a b".into())),
            some(Avro::String("c,d".into())),
        ]),
    );
    put(
        "am",
        Avro::Array(vec![
            some(Avro::String("sad".into())),
            some(Avro::String("happy".into())),
        ]),
    );
    put("iv", Avro::String("P1DT2H".into()));
    put("nul", Avro::Null);
    m
}

fn assert_row(actual: &HashMap<String, Avro>, expected: &HashMap<String, Avro>, what: &str) {
    for (k, v) in expected {
        assert_eq!(actual.get(k), Some(v), "{what}: column {k}");
    }
    assert_eq!(actual.len(), expected.len(), "{what}: column count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_type_arrives_exactly() {
    let db = unique("ops");
    let client = fresh_db(&db).await;
    client.batch_execute(ALL_TYPES_DDL).await.expect("ddl");
    client
        .batch_execute(&format!(
            "INSERT INTO all_types VALUES {}",
            all_types_row(1)
        ))
        .await
        .expect("snapshot row");
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;

    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO all_types VALUES {}; UPDATE all_types SET t = 'changed' WHERE id = 2; COMMIT;",
            all_types_row(2)
        ))
        .await
        .expect("insert+update");
    client
        .batch_execute("UPDATE all_types SET id = 3 WHERE id = 2")
        .await
        .expect("key change");
    client
        .batch_execute("DELETE FROM all_types WHERE id = 1")
        .await
        .expect("delete");
    client
        .batch_execute("TRUNCATE all_types")
        .await
        .expect("truncate");

    // t (snapshot start), r, c, u, u(key change), tombstone(old key), d, tombstone, t
    let records = consume(&spec.topic("all_types"), 9, SECS(3), SECS(60)).await;
    let ops: Vec<Option<String>> = records.iter().map(|r| r.op()).collect();
    assert_eq!(
        ops,
        [
            Some("t"),
            Some("r"),
            Some("c"),
            Some("u"),
            Some("u"),
            None,
            Some("d"),
            None,
            Some("t")
        ]
        .iter()
        .map(|s| s.map(str::to_string))
        .collect::<Vec<_>>(),
        "operations in order (None is the tombstone)"
    );
    let [snap_start, read, ins, upd, rekey, old_key_tomb, del, tomb, trunc] = &records[..] else {
        panic!("nine records expected, got {}", records.len())
    };

    // The snapshot opens with a truncate at its consistent point: consumers replace the table.
    assert!(snap_start.key.is_none());
    assert!(snap_start.row("before").is_none() && snap_start.row("after").is_none());
    assert_eq!(snap_start.source("snapshot"), Avro::String("true".into()));
    assert_eq!(snap_start.position(), (read.position().0, 0));

    // Snapshot read: the full row, marked as the last snapshot row, no transaction id.
    assert_eq!(read.key_long("id"), Some(1));
    assert!(read.row("before").is_none());
    assert_row(
        &read.row("after").expect("after"),
        &expected_all_types(1),
        "snapshot row",
    );
    assert_eq!(read.source("snapshot"), Avro::String("last".into()));
    assert_eq!(read.source("txId"), none());
    assert_eq!(read.source("name"), Avro::String(db.clone()));
    assert_eq!(read.source("db"), Avro::String(db.clone()));
    assert_eq!(read.source("schema"), Avro::String("public".into()));
    assert_eq!(read.source("table"), Avro::String("all_types".into()));
    assert_eq!(read.source("connector"), Avro::String("postgresql".into()));

    // Streamed insert and update of one transaction: same lsn and txId, seq 0 then 1.
    assert_eq!(ins.key_long("id"), Some(2));
    assert!(ins.row("before").is_none());
    assert_row(
        &ins.row("after").expect("after"),
        &expected_all_types(2),
        "streamed insert",
    );
    assert_eq!(ins.source("snapshot"), Avro::String("false".into()));
    assert!(matches!(ins.source("txId"), Avro::Union(1, _)));
    assert_eq!(ins.source("txId"), upd.source("txId"));
    let (lsn_ins, seq_ins) = ins.position();
    let (lsn_upd, seq_upd) = upd.position();
    assert_eq!((lsn_ins, seq_ins, seq_upd), (lsn_upd, 0, 1));
    assert!(
        lsn_ins > read.position().0,
        "streamed commit is after the snapshot point"
    );
    // The source transaction travels as headers too, in PostgreSQL's notation.
    let lsn_text = format!("{:X}/{:X}", lsn_ins >> 32, lsn_ins & 0xffff_ffff);
    assert_eq!(ins.headers.get("bitclone9.lsn"), Some(&lsn_text));
    assert_eq!(
        ins.headers.get("bitclone9.seq").map(String::as_str),
        Some("0")
    );
    let Avro::Union(1, xid) = ins.source("txId") else {
        panic!("streamed change has a txId")
    };
    let Avro::Long(xid) = *xid else {
        panic!("txId is a long")
    };
    assert_eq!(ins.headers.get("bitclone9.txid"), Some(&xid.to_string()));
    assert!(
        !read.headers.contains_key("bitclone9.txid"),
        "snapshot rows have no transaction id"
    );
    assert!(
        upd.row("before").is_none(),
        "default replica identity: no old row when the key is unchanged"
    );
    let mut after = expected_all_types(2);
    after.insert("t".into(), Avro::String("changed".into()));
    assert_row(&upd.row("after").expect("after"), &after, "update");

    // Key change: the old key travels in before (other columns null), the key is the new one.
    assert_eq!(rekey.key_long("id"), Some(3));
    let before = rekey.row("before").expect("old key present");
    assert_eq!(before["id"], Avro::Long(2));
    assert_eq!(before["t"], Avro::Null);
    assert_eq!(rekey.row("after").expect("after")["id"], Avro::Long(3));
    // ... and the old key is closed with a tombstone, so compaction cannot keep a stale row.
    assert!(old_key_tomb.value.is_none());
    assert_eq!(old_key_tomb.key_long("id"), Some(2));

    // Delete: old key in before, no after; then a tombstone with the same key.
    assert_eq!(del.key_long("id"), Some(1));
    assert_eq!(del.row("before").expect("before")["id"], Avro::Long(1));
    assert!(del.row("after").is_none());
    assert!(tomb.value.is_none());
    assert_eq!(tomb.key_long("id"), Some(1));

    // Truncate: no key, no rows.
    assert!(trunc.key.is_none());
    assert!(trunc.row("before").is_none() && trunc.row("after").is_none());
    assert_eq!(trunc.source("table"), Avro::String("all_types".into()));

    assert_eq!(
        daemon.terminate(),
        Some(0),
        "SIGTERM stops cleanly with exit 0"
    );
    cleanup(&db).await;
}

/// Applies events in order to a key → row-value map (the "final state on Kafka").
fn replay(records: &[Record], column: &str) -> BTreeMap<i64, Option<String>> {
    let mut state = BTreeMap::new();
    for r in records {
        match r.op().as_deref() {
            Some("r" | "c" | "u") => {
                if let Some(before) = r.row("before") {
                    if let Avro::Long(old) = before["id"] {
                        state.remove(&old);
                    }
                }
                let after = r.row("after").expect("after");
                let id = match after["id"] {
                    Avro::Long(v) => v,
                    ref other => panic!("id {other:?}"),
                };
                let v = match &after[column] {
                    Avro::String(s) => Some(s.clone()),
                    _ => None,
                };
                state.insert(id, v);
            }
            Some("d") => {
                if let Avro::Long(id) = r.row("before").expect("before")["id"] {
                    state.remove(&id);
                }
            }
            Some("t") => state.clear(),
            _ => {}
        }
    }
    state
}

async fn table_state(
    client: &tokio_postgres::Client,
    table: &str,
) -> BTreeMap<i64, Option<String>> {
    client
        .query(&format!("SELECT id, val FROM {table}"), &[])
        .await
        .expect("select")
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1)))
        .collect()
}

fn assert_no_doubles(records: &[Record]) {
    let mut seen = HashSet::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        assert!(
            seen.insert((r.position(), r.op())),
            "event {:?} {:?} sent twice",
            r.op(),
            r.position()
        );
    }
}

/// Writes random inserts, updates and deletes until told to stop; returns how many it made.
fn start_writer(
    db: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let s = stack();
        let c = connect(&db, &s.pg_user, &s.pg_password).await;
        let mut n = 0u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        while !*stop.borrow() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % 30_000) as i64;
            let sql = match x % 4 {
                0 => format!("DELETE FROM t WHERE id = {id}"),
                1 => format!("UPDATE t SET val = 'u{n}' WHERE id = {id}"),
                _ => format!("INSERT INTO t VALUES ({id}, 'i{n}') ON CONFLICT (id) DO UPDATE SET val = 'c{n}'"),
            };
            c.batch_execute(&format!("BEGIN; {sql}; {sql}; COMMIT"))
                .await
                .expect("writer statement");
            n += 1;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_taken_during_writes_matches_the_table() {
    let (db, client) = db_with(
        "snap",
        "CREATE TABLE t (id bigint PRIMARY KEY, val text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20000) g;",
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = start_writer(db.clone(), stop_rx);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut spec = SourceSpec::new(&db);
    spec.extra = "[sources.SRC.topics]\npartitions = 3\ncleanup_policy = \"compact,delete\"\n[sources.SRC.topics.config]\n\"retention.ms\" = \"3600000\"".replace("SRC", &db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start(&cfg, "daemon");
    daemon
        .wait_log("snapshot delivered and recorded", SECS(120))
        .await;
    let topic = spec.topic("t");
    assert_eq!(
        topic_partitions(&topic).await,
        3,
        "created with the configured partitions"
    );
    let configs = topic_configs(&topic).await;
    assert_eq!(
        configs.get("cleanup.policy").map(String::as_str),
        Some("compact,delete")
    );
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    tokio::time::sleep(SECS(2)).await;
    stop_tx.send(true).expect("stop writer");
    let writes = writer.await.expect("writer");
    assert!(
        writes > 50,
        "the writer ran during the snapshot ({writes} transactions)"
    );

    let admin = admin_in(&db).await;
    let end = current_lsn(&admin).await;
    wait_confirmed(&admin, &format!("bitclone9_{db}"), end, SECS(60)).await;
    let records = consume(&spec.topic("t"), 20000, SECS(3), SECS(120)).await;
    assert!(records.iter().any(|r| r.op().as_deref() == Some("r")));
    assert!(records.iter().any(|r| r.op().as_deref() == Some("c")));
    assert_no_doubles(&records);
    let on_kafka = replay(&records, "val");
    let in_table = table_state(&client, "t").await;
    assert_eq!(
        on_kafka.len(),
        in_table.len(),
        "row count on Kafka equals the table"
    );
    assert!(
        on_kafka == in_table,
        "final state on Kafka equals the table"
    );
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

/// Transactions seen by a test_decoding slot: (commit end LSN, ids inserted).
async fn observed_transactions(admin: &tokio_postgres::Client, slot: &str) -> Vec<(u64, Vec<i64>)> {
    let rows = admin
        .query(
            "SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM pg_logical_slot_peek_changes($1, NULL, NULL)",
            &[&slot],
        )
        .await
        .expect("peek observer slot");
    let mut txs = Vec::new();
    let mut ids = Vec::new();
    for r in rows {
        let lsn: i64 = r.get(0);
        let data: String = r.get(1);
        if data.starts_with("BEGIN") {
            ids.clear();
        } else if data.starts_with("COMMIT") {
            txs.push((lsn as u64, std::mem::take(&mut ids)));
        } else if let Some(rest) = data.split("id[bigint]:").nth(1) {
            if data.contains(": INSERT:") {
                ids.push(
                    rest.split(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .expect("id"),
                );
            }
        }
    }
    txs
}

fn kafka_ids(records: &[Record]) -> HashMap<i64, HashSet<(i64, i64)>> {
    let mut ids: HashMap<i64, HashSet<(i64, i64)>> = HashMap::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        if let Some(id) = r.key_long("id") {
            ids.entry(id).or_default().insert(r.position());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_load_loses_nothing_and_never_confirms_ahead_of_kafka() {
    let (db, _) = db_with(
        "kill",
        "CREATE TABLE load (id bigint PRIMARY KEY, payload text)",
    )
    .await;
    let admin = admin_in(&db).await;
    let observer = format!("obs_{db}");
    admin
        .query(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&observer],
        )
        .await
        .expect("observer slot");
    let slot = format!("bitclone9_{db}");

    // Load: transactions of 20 inserts, about 150 a second (bounded, so a debug build keeps up).
    let (stop_tx, load) = start_insert_load(&db, "load", 20, 200);

    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut checked_txs = 0;
    for round in 0..3 {
        let mut daemon = Daemon::start(&cfg, &format!("daemon{round}"));
        daemon.wait_log("streaming started", SECS(60)).await;
        tokio::time::sleep(Duration::from_millis(1500 + 700 * round)).await;
        daemon.kill9();
        let confirmed = confirmed_flush(&admin, &slot).await.expect("slot exists");
        let records = consume(&spec.topic("load"), 1, SECS(3), SECS(60)).await;
        let on_kafka = kafka_ids(&records);
        for (end_lsn, ids) in observed_transactions(&admin, &observer).await {
            if end_lsn <= confirmed {
                checked_txs += 1;
                for id in ids {
                    assert!(
                        on_kafka.contains_key(&id),
                        "round {round}: the slot confirmed {confirmed:X} but row {id} of the transaction ending at {end_lsn:X} is not on Kafka"
                    );
                }
            }
        }
    }
    assert!(
        checked_txs > 10,
        "the check covered confirmed transactions ({checked_txs})"
    );

    let mut daemon = Daemon::start_streaming(&cfg, "daemon_final").await;
    tokio::time::sleep(SECS(1)).await;
    stop_tx.send(true).expect("stop load");
    let inserted = load.await.expect("load task");
    let end = current_lsn(&admin).await;
    wait_confirmed(&admin, &slot, end, SECS(120)).await;
    let records = consume(&spec.topic("load"), inserted as usize, SECS(3), SECS(180)).await;
    let on_kafka = kafka_ids(&records);
    for id in 0..inserted {
        let positions = on_kafka
            .get(&id)
            .unwrap_or_else(|| panic!("committed row {id} is missing from Kafka"));
        assert_eq!(
            positions.len(),
            1,
            "row {id}: a re-sent event carries the same (lsn, seq)"
        );
    }
    assert_eq!(daemon.terminate(), Some(0));
    admin
        .query("SELECT pg_drop_replication_slot($1)", &[&observer])
        .await
        .expect("drop observer");
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_flagged_never_faked() {
    let (db, client) = db_with(
        "toast",
        "CREATE TABLE doc (id int PRIMARY KEY, body text, n int);
             ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = "snapshot = \"never\"".into();
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;

    let body: String = (0..3000)
        .map(|i| format!("{:x}", (i * 2_654_435_761u64) % 4096))
        .collect();
    assert!(body.len() > 8000);
    client
        .execute("INSERT INTO doc VALUES (1, $1, 0)", &[&body])
        .await
        .expect("insert");
    client
        .batch_execute("UPDATE doc SET n = 1 WHERE id = 1")
        .await
        .expect("update");
    client
        .batch_execute("UPDATE doc SET id = 2 WHERE id = 1")
        .await
        .expect("key change");
    client
        .batch_execute("ALTER TABLE doc REPLICA IDENTITY FULL; UPDATE doc SET n = 2 WHERE id = 2;")
        .await
        .expect("update under full identity");

    let records = consume(&spec.topic("doc"), 5, SECS(3), SECS(60)).await;
    assert_eq!(
        records.len(),
        5,
        "insert, two updates, a key change with its tombstone"
    );
    let unchanged =
        |r: &Record| match common::field(r.value.as_ref().expect("value"), "unchanged_columns") {
            Avro::Array(items) => items.clone(),
            other => panic!("unchanged_columns {other:?}"),
        };
    let after = |r: &Record| r.row("after").expect("after");

    assert_eq!(after(&records[0])["body"], Avro::String(body.clone()));
    assert!(unchanged(&records[0]).is_empty());

    // Default identity: the untouched TOAST value is not sent; the event says so explicitly.
    assert_eq!(after(&records[1])["n"], Avro::Int(1));
    assert_eq!(
        after(&records[1])["body"],
        Avro::Null,
        "no placeholder value"
    );
    assert_eq!(unchanged(&records[1]), vec![Avro::String("body".into())]);

    // A key change sends only the old key: its NULLs must not pass for the unchanged value.
    assert_eq!(after(&records[2])["id"], Avro::Int(2));
    assert_eq!(after(&records[2])["body"], Avro::Null, "no value made up");
    assert_eq!(unchanged(&records[2]), vec![Avro::String("body".into())]);
    assert!(records[3].value.is_none(), "tombstone for the old key");

    // REPLICA IDENTITY FULL: the old row carries the value, so the new row is complete.
    assert_eq!(after(&records[4])["n"], Avro::Int(2));
    assert_eq!(after(&records[4])["body"], Avro::String(body));
    assert!(unchanged(&records[4]).is_empty());
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_captured_database_does_not_hold_wal() {
    let (db, _) = db_with("idle", "CREATE TABLE quiet (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    let slot = format!("bitclone9_{db}");

    // Another database of the cluster writes plenty of WAL; the captured one stays idle.
    let busy = unique("busy");
    let other = fresh_db(&busy).await;
    other
        .batch_execute(
            "CREATE TABLE churn (id int, pad text);
             INSERT INTO churn SELECT g, repeat('y', 100) FROM generate_series(1, 200000) g;",
        )
        .await
        .expect("churn");
    let admin = admin().await;
    let written_to = current_lsn(&admin).await;
    wait_confirmed(&admin, &slot, written_to, SECS(30)).await;

    // The slot's restart point follows once the server logs its running transactions.
    let deadline = std::time::Instant::now() + SECS(60);
    loop {
        admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
        let retained: i64 = admin
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("retained")
            .get(0);
        if retained < 4 * 1024 * 1024 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot still retains {retained} bytes of WAL"
        );
        tokio::time::sleep(SECS(2)).await;
    }
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
    cleanup(&busy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_checkpoints_confirms_and_loses_nothing() {
    let (db, _) = db_with(
        "term",
        "CREATE TABLE load (id bigint PRIMARY KEY, payload text)",
    )
    .await;
    let admin = admin_in(&db).await;
    let slot = format!("bitclone9_{db}");
    let (stop_tx, load) = start_insert_load(&db, "load", 10, 1);
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    tokio::time::sleep(SECS(2)).await;
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM under load exits 0");
    // The final position was checkpointed and confirmed to the slot before exiting.
    let log = daemon.log_text();
    let stopped = log
        .lines()
        .find(|l| l.contains("pipeline stopped") && l.contains("lsn=Some"))
        .unwrap_or_else(|| panic!("final position logged: {log}"));
    let final_lsn: bitclone9_core::Lsn = stopped
        .split("lsn=Some(\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|l| l.parse().ok())
        .expect("final LSN");
    let confirmed = confirmed_flush(&admin, &slot).await.expect("slot");
    assert!(
        confirmed >= final_lsn.0,
        "slot confirmed {confirmed:X}, final checkpoint {final_lsn}"
    );

    let mut daemon = Daemon::start_streaming(&cfg, "daemon2").await;
    stop_tx.send(true).expect("stop load");
    let inserted = load.await.expect("load");
    let end = current_lsn(&admin).await;
    wait_confirmed(&admin, &slot, end, SECS(60)).await;
    let records = consume(&spec.topic("load"), inserted as usize, SECS(3), SECS(120)).await;
    let ids: HashSet<i64> = records.iter().filter_map(|r| r.key_long("id")).collect();
    for id in 0..inserted {
        assert!(
            ids.contains(&id),
            "row {id} committed around the stop is on Kafka"
        );
    }
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_checkpoint_from_another_slot_is_forgotten_when_the_slot_is_recreated() {
    let (db, client) = db_with(
        "stale",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .await;
    let spec = SourceSpec::new(&db);
    let (cfg, dir) = write_config(&spec, "");
    // A checkpoint left by a slot on another server, far ahead of this one's WAL.
    {
        let store =
            bitclone9::checkpoint::CheckpointStore::open(&dir.join("state")).expect("store");
        store
            .mark_snapshot_done(&db, bitclone9_core::Lsn(u64::MAX / 4))
            .expect("stale record");
    }
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("insert");
    let admin = admin_in(&db).await;
    let slot = format!("bitclone9_{db}");
    let end = current_lsn(&admin).await;
    wait_confirmed(&admin, &slot, end, SECS(30)).await;
    assert_eq!(daemon.terminate(), Some(0));

    // After a restart it resumes from the new slot's position, not the stale one.
    let mut daemon = Daemon::start_streaming(&cfg, "daemon2").await;
    client
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .expect("insert");
    let records = consume(&spec.topic("t"), 3, SECS(3), SECS(60)).await;
    let ids: HashSet<i64> = records.iter().filter_map(|r| r.key_long("id")).collect();
    assert_eq!(
        ids,
        HashSet::from([1, 2, 3]),
        "the snapshot row and both later rows arrive"
    );
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}
