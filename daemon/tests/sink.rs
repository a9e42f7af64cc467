//! Sinks against the real stack: a PostgreSQL database cloned through Kafka into another one,
//! replayed, crashed, fed poison, and verified.

mod common;

use common::clone::{wait_equal, Clone};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const ALL_TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN price AS numeric(12,2);
CREATE TABLE items (
    id bigint PRIMARY KEY,
    sm smallint, i int, name text, vc varchar(20), ch char(3),
    price numeric(10,2), big numeric, dom price,
    f4 real, f8 double precision, flag boolean,
    d date, t time, ts timestamp, tz timestamptz,
    u uuid, j jsonb, js json, b bytea, m mood,
    tags text[], nums int[], amounts numeric(12,3)[], moods mood[],
    iv interval, ip inet, doc text
);
CREATE TABLE orders (region text, n int, v text, PRIMARY KEY (region, n));
CREATE TABLE scratch (id int PRIMARY KEY, v text);
CREATE TABLE full_ident (id int PRIMARY KEY, v text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
";

const TARGET_TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN price AS numeric(12,2);
";

/// Inserts `n` rows into items starting at `from`, with every type filled (some NULL).
fn items_insert(from: i64, n: i64) -> String {
    format!(
        "INSERT INTO items SELECT g, (g % 30000)::smallint, g::int * 7, 'name ' || g || E'\\t\\\\ \"q\"\\n',
            'vc' || g, 'c' || (g % 10), (g * 1.25)::numeric(10,2), g * 1000000000000.000001, g / 3.0,
            g / 7.0, g / 9.0, g % 2 = 0,
            DATE '2024-02-29' + (g % 1000)::int - 500, TIME '12:30:45.123456' + g * interval '1 second',
            TIMESTAMP '0044-03-15 12:00:00 BC' + g * interval '1 day',
            TIMESTAMPTZ '2024-01-01 00:00:00+02' + g * interval '1 microsecond',
            md5(g::text)::uuid, jsonb_build_object('k', g, 'a', jsonb_build_array(1, 'x')), '{{\"z\": 1,  \"a\": 2}}',
            decode(md5(g::text), 'hex'), (ARRAY['sad','ok','happy']::mood[])[1 + g % 3],
            ARRAY['a', NULL, 'b,c', 'd\"e', 'NULL'], ARRAY[g::int, NULL, -1], ARRAY[1.5, NULL]::numeric(12,3)[],
            ARRAY['ok','happy']::mood[], make_interval(days => g::int, secs => 1.5), '10.0.0.1/8',
            CASE WHEN g % 50 = 0 THEN (SELECT string_agg(md5(g::text || x::text), '') FROM generate_series(1, 300) x) END
          FROM generate_series({from}, {}) g",
        from + n - 1
    )
}

/// Mixed load on the all-types schema until `stop`: inserts, updates (some leaving the large
/// TOASTed doc unchanged), deletes, key changes on orders, and truncate + refill of scratch.
fn start_mixed_load(
    db: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    let db = db.to_string();
    tokio::spawn(async move {
        let s = stack();
        let c = connect(&db, &s.pg_user, &s.pg_password).await;
        let mut round = 0u64;
        let mut next = 100_000i64;
        while !*stop.borrow() {
            round += 1;
            let r = round as i64;
            let sql = format!(
                "BEGIN;
                 {ins};
                 UPDATE items SET i = i + 1, name = 'upd ' || {r} WHERE id % 97 = {m};
                 UPDATE items SET flag = NOT flag WHERE doc IS NOT NULL AND id % 13 = {m13};
                 DELETE FROM items WHERE id % 89 = {m89} AND id > 200;
                 INSERT INTO orders VALUES ('eu', {r}, 'o{r}'), ('us', {r}, 'o{r}');
                 UPDATE orders SET n = n + 100000 WHERE region = 'eu' AND n = {r} - 1;
                 INSERT INTO orders VALUES ('eu', {r} - 1, 'again');
                 DELETE FROM orders WHERE region = 'us' AND n = {r} - 2;
                 INSERT INTO full_ident VALUES ({r}, 'f') ON CONFLICT (id) DO UPDATE SET v = 'g';
                 UPDATE full_ident SET v = v || 'x' WHERE id = {r} / 2;
                 COMMIT;",
                ins = items_insert(next, 5),
                m = r % 97,
                m13 = r % 13,
                m89 = r % 89,
            );
            next += 5;
            c.batch_execute(&sql).await.expect("mixed load");
            if round.is_multiple_of(40) {
                c.batch_execute(&format!(
                    "BEGIN; TRUNCATE scratch; INSERT INTO scratch SELECT g, 'r{r}' FROM generate_series(1, 20) g; COMMIT;"
                ))
                .await
                .expect("truncate load");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        round
    })
}

async fn types(c: &Client) -> Vec<String> {
    c.query(
        "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[],
    )
    .await
    .expect("types")
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

async fn positions(c: &Client, sink: String) -> Vec<(String, i32, i64)> {
    c.query(
        "SELECT topic, kafka_partition, kafka_offset FROM bitclone9.sink_positions WHERE sink = $1 ORDER BY 1, 2",
        &[&sink],
    )
    .await
    .expect("positions")
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, i64>(2)))
    .collect()
}

const TABLES: &[(&str, &str)] = &[
    ("items", "id"),
    ("orders", "region, n"),
    ("scratch", "id"),
    ("full_ident", "id"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_all_types_under_load_then_verify_and_replay() {
    let cl = Clone::new("skclone", ALL_TYPES, TARGET_TYPES, "").await;
    cl.src
        .batch_execute(&items_insert(1, 3000))
        .await
        .expect("seed");
    cl.src
        .batch_execute("INSERT INTO scratch SELECT g, 'seed' FROM generate_series(1, 10) g; INSERT INTO items (id) VALUES (0)")
        .await
        .expect("seed");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Load runs during the snapshot and after it.
    let load = start_mixed_load(&cl.spec.db, stop_rx);
    let mut daemon = Daemon::start(&cl.config, "clone");
    daemon
        .wait_log("streaming started", Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = stop_tx.send(true);
    let rounds = load.await.expect("load");
    assert!(rounds > 20, "the load ran {rounds} rounds");
    wait_equal(&cl, TABLES, Duration::from_secs(120)).await;

    let (code, out) = cli(&cl.config, &["verify", "--chunk-rows", "500"], &[]);
    assert_eq!(code, Some(0), "verify: {out}");
    assert!(out.contains("public.items → public.items: equal"), "{out}");
    assert!(out.contains("verify: all 4 table(s) equal"), "{out}");

    // The cloned table has the source's column types.
    assert_eq!(types(&cl.src).await, types(&cl.dst).await);

    // Replay: forget the sink's offsets and apply every topic again from offset 0.
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    let before: HashMap<&str, Vec<String>> = {
        let mut m = HashMap::new();
        for (t, o) in TABLES {
            m.insert(*t, dump(&cl.dst, t, o).await);
        }
        m
    };
    let applied = positions(&cl.dst, cl.sink()).await;
    assert!(!applied.is_empty());
    let (code, out) = cli(
        &cl.config,
        &["offsets", "reset", "--sink", &cl.sink(), "--yes"],
        &[],
    );
    assert_eq!(code, Some(0), "reset: {out}");
    assert!(
        positions(&cl.dst, cl.sink()).await.is_empty(),
        "reset forgets the target positions"
    );
    // A row lost behind the sink's back comes back only if the replay really re-applies.
    cl.dst
        .batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .expect("delete");
    let mut daemon = Daemon::start(&cl.config, "replay");
    let deadline = Instant::now() + Duration::from_secs(120);
    while positions(&cl.dst, cl.sink()).await != applied {
        assert!(
            Instant::now() < deadline,
            "replay did not reach {applied:?}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (t, o) in TABLES {
        assert_eq!(dump(&cl.dst, t, o).await, before[t], "{t} after replay");
    }
    let (code, out) = cli(&cl.config, &["offsets", "show"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("lag 0"), "{out}");
    // The running daemon's /status shows the sink's partitions and lag.
    let addr = admin_addr(&mut daemon).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(&addr, "/status", None).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        let sink = &v["connectors"][cl.sink()]["sink"];
        if sink["lag_records"] == 0 && sink["partitions"].as_array().is_some_and(|p| p.len() == 4) {
            break;
        }
        assert!(Instant::now() < deadline, "status: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkill_during_load_loses_and_doubles_nothing() {
    // Three partitions per topic, applied on three target sessions at once: truncates (user
    // ones, and those opening each snapshot) must wait for every partition.
    let cl = Clone::with_partitions(
        "skcrash",
        ALL_TYPES,
        TARGET_TYPES,
        "max_batch_events = 300\napply_concurrency = 3",
        3,
    )
    .await;
    // Enough rows that early kills can land in the snapshot.
    cl.src
        .batch_execute(&items_insert(1, 15000))
        .await
        .expect("seed");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = start_mixed_load(&cl.spec.db, stop_rx);
    let mut seed = std::process::id() as u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..10 {
        let mut daemon = Daemon::start(&cl.config, &format!("crash{i}"));
        let wait = 800 + rand() % 2500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        assert!(
            daemon.is_running(),
            "daemon died by itself:\n{}",
            daemon.log_text()
        );
        daemon.kill9();
    }
    let _ = stop_tx.send(true);
    load.await.expect("load");
    let mut daemon = Daemon::start(&cl.config, "final");
    let t0 = Instant::now();
    wait_equal(&cl, TABLES, Duration::from_secs(180)).await;
    eprintln!("equal after {:?}", t0.elapsed());
    let (code, out) = cli(&cl.config, &["verify"], &[]);
    eprintln!("verified after {:?}", t0.elapsed());
    assert_eq!(code, Some(0), "verify: {out}");
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

/// Reads every record of `topic` (from the start) until `n` arrived or `timeout` passed.
async fn read_raw(
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(HashMap<String, String>, Option<Vec<u8>>)> {
    let s = stack();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("group.id", unique("bc9raw"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        let m = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
        if let Some(Ok(m)) = m {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((headers, m.payload().map(<[u8]>::to_vec)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_topic_and_the_rest_is_applied() {
    let ddl = "CREATE TABLE acct (id int PRIMARY KEY, qty int)";
    // The target refuses quantities of 1000 and more.
    let cl = Clone::new(
        "skpoison",
        ddl,
        "CREATE TABLE acct (id int PRIMARY KEY, qty int CHECK (qty < 1000))",
        "",
    )
    .await;
    let sink = cl.sink();
    let dlq = format!("bitclone9.dead-letter.{sink}");
    let topic = cl.spec.topic("acct");
    // The first batch both prepares the table and holds a refused row: the refusal must not
    // cost the rows beside it.
    cl.src
        .batch_execute("INSERT INTO acct SELECT g, g FROM generate_series(1, 5) g; INSERT INTO acct VALUES (99, 9999)")
        .await
        .expect("rows");
    let mut daemon = Daemon::start(&cl.config, "poison");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = cl
            .dst
            .query_one("SELECT count(*) FROM acct", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "first rows not applied; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Garbage bytes and an unknown schema id, produced straight into the sink's topic.
    let s = stack();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .create()
        .expect("producer");
    for payload in [
        b"not avro at all".to_vec(),
        vec![0, 0x7f, 0xff, 0xff, 0xf0, 2, 4, 6],
    ] {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(&topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .expect("produce poison");
    }
    // A row the target's constraint refuses, between good rows.
    cl.src
        .batch_execute("INSERT INTO acct VALUES (6, 6); INSERT INTO acct VALUES (7, 5000); INSERT INTO acct VALUES (8, 8); UPDATE acct SET qty = 50 WHERE id = 1")
        .await
        .expect("more rows");
    let letters = read_raw(&dlq, 4, Duration::from_secs(90)).await;
    assert_eq!(
        letters.len(),
        4,
        "dead letters: {letters:?}\nlog:\n{}",
        daemon.log_text()
    );
    let kinds: Vec<&str> = letters
        .iter()
        .map(|(h, _)| h["bitclone9.error.kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        vec!["23514", "frame", "unknown_schema", "23514"],
        "{letters:?}"
    );
    for (h, payload) in &letters {
        assert_eq!(h["bitclone9.source.topic"], topic);
        assert_eq!(h["bitclone9.source.partition"], "0");
        assert!(h["bitclone9.source.offset"].parse::<i64>().is_ok());
        assert_eq!(h["bitclone9.sink"], sink);
        assert!(!h["bitclone9.error"].is_empty());
        assert!(payload.is_some(), "the original bytes are kept");
    }
    assert_eq!(letters[1].1.as_deref(), Some(&b"not avro at all"[..]));
    // The refused row's letter names its source transaction.
    assert!(
        letters[3].0.contains_key("bitclone9.lsn"),
        "{:?}",
        letters[3].0
    );
    assert!(
        letters[3].0["bitclone9.error"].contains("acct"),
        "{:?}",
        letters[3].0
    );
    // Everything else is applied, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<(i32, i32)> = cl
            .dst
            .query("SELECT id, qty FROM acct ORDER BY id", &[])
            .await
            .expect("rows")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if rows == vec![(1, 50), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8)] {
            break;
        }
        assert!(Instant::now() < deadline, "target rows {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let addr = admin_addr(&mut daemon).await;
    let (_, metrics) = http_get(&addr, "/metrics", None).await;
    let m = parse_prometheus(&metrics);
    let dead: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("bitclone9_sink_dead_letters_total") && k.contains(&sink))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(dead, 4.0, "{metrics}");
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_key_range_of_a_row_changed_behind_the_sinks_back() {
    let cl = Clone::new(
        "skverify",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "",
        "",
    )
    .await;
    cl.src
        .batch_execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g")
        .await
        .expect("rows");
    let mut daemon = Daemon::start(&cl.config, "verify");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    assert_eq!(daemon.terminate(), Some(0));
    let (code, out) = cli(
        &cl.config,
        &["verify", "--chunk-rows", "100", "--rounds", "1"],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    // Range starts cross a digit count (991 → 1036 would sort before 136 as text): the ranges
    // are cut in key order, ceil(1000 / 45) of them, and the rows are counted once.
    let (code, out) = cli(
        &cl.config,
        &["verify", "--chunk-rows", "45", "--rounds", "1"],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("equal (1000 rows in 23 key range(s))"),
        "{out}"
    );

    cl.dst
        .batch_execute("UPDATE t SET v = 'tampered' WHERE id = 868")
        .await
        .expect("tamper");
    let (code, out) = cli(
        &cl.config,
        &["verify", "--chunk-rows", "45", "--rounds", "1"],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("public.t → public.t: DIFFERENT in 1 of 23 key range(s)"),
        "{out}"
    );
    assert!(out.contains("(id) >= (856) AND (id) < (901): source 45 rows, target 45 rows (same count, different content)"), "{out}");
    cl.dst
        .batch_execute("UPDATE t SET v = 'v868' WHERE id = 868")
        .await
        .expect("untamper");

    cl.dst
        .batch_execute("UPDATE t SET v = 'tampered' WHERE id = 555")
        .await
        .expect("tamper");
    let (code, out) = cli(
        &cl.config,
        &[
            "verify",
            "--chunk-rows",
            "100",
            "--rounds",
            "2",
            "--interval",
            "100ms",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("public.t → public.t: DIFFERENT in 1 of 10 key range(s)"),
        "{out}"
    );
    assert!(out.contains("(id) >= (501) AND (id) < (601): source 100 rows, target 100 rows (same count, different content)"), "{out}");

    cl.dst
        .batch_execute("DELETE FROM t WHERE id = 1000")
        .await
        .expect("delete");
    let (code, out) = cli(
        &cl.config,
        &["verify", "--chunk-rows", "100", "--rounds", "1"],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("(id) >= (901): source 100 rows, target 99 rows"),
        "{out}"
    );

    // Reset to a time after every record: nothing is applied again, the damage stays.
    let later =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let (code, out) = cli(
        &cl.config,
        &[
            "offsets",
            "reset",
            "--sink",
            &cl.sink(),
            "--to-time",
            &later,
            "--yes",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("resumes at offset"), "{out}");
    let mut daemon = Daemon::start(&cl.config, "verify2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, out) = cli(
        &cl.config,
        &["verify", "--chunk-rows", "100", "--rounds", "1"],
        &[],
    );
    assert_eq!(
        code,
        Some(1),
        "nothing re-applied after a reset to the end: {out}"
    );
    assert_eq!(daemon.terminate(), Some(0));
    // Reset to offset 0: everything is applied again and the target heals.
    let (code, out) = cli(
        &cl.config,
        &[
            "offsets",
            "reset",
            "--sink",
            &cl.sink(),
            "--to-offset",
            "0",
            "--yes",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    let mut daemon = Daemon::start(&cl.config, "verify3");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_that_keeps_a_toasted_value_is_a_dead_letter_not_a_lost_value() {
    let cl = Clone::new(
        "skrekey",
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)",
        "",
        "",
    )
    .await;
    let dlq = format!("bitclone9.dead-letter.{}", cl.sink());
    // An incompressible value well above the TOAST threshold.
    cl.src
        .batch_execute("INSERT INTO docs SELECT 1, 'a', string_agg(md5(g::text), '') FROM generate_series(1, 400) g")
        .await
        .expect("row");
    let mut daemon = Daemon::start(&cl.config, "rekey");
    wait_equal(&cl, &[("docs", "id")], Duration::from_secs(90)).await;
    // Under the default replica identity PostgreSQL does not send the unchanged body.
    cl.src
        .batch_execute("UPDATE docs SET id = 2, title = 'b' WHERE id = 1")
        .await
        .expect("key change");
    let letters = read_raw(&dlq, 1, Duration::from_secs(60)).await;
    assert_eq!(letters.len(), 1, "log:\n{}", daemon.log_text());
    assert!(
        letters[0].0["bitclone9.error"].contains("REPLICA IDENTITY FULL"),
        "{:?}",
        letters[0].0
    );
    // The row under the new key was not written with an empty body.
    let bodies: Vec<Option<String>> = cl
        .dst
        .query("SELECT body FROM docs WHERE id = 2", &[])
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(bodies.is_empty(), "{bodies:?}");
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_at_the_source_is_added_to_the_target() {
    let cl = Clone::new(
        "skcolumn",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "",
        "",
    )
    .await;
    cl.src
        .batch_execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    let mut daemon = Daemon::start(&cl.config, "column");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    cl.src
        .batch_execute(
            "ALTER TABLE t ADD COLUMN w numeric(8,2); UPDATE t SET w = 7.5 WHERE id = 1; INSERT INTO t VALUES (11, 'v11', 9.25)",
        )
        .await
        .expect("new column");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    let ty: String = cl
        .dst
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'w'",
            &[],
        )
        .await
        .expect("the target has the new column")
        .get(0);
    assert_eq!(ty, "numeric(8,2)");
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_rows_ends_at_max_batch_bytes() {
    // Rows of about 2 KB on Kafka; a batch may hold 8 KB of them, so at most 4 (it ends at the
    // record that reaches the bound; the snapshot's opening truncate may join one), where
    // max_batch_events alone would take hundreds.
    let cl = Clone::new(
        "skbatchbytes",
        "CREATE TABLE t (id int PRIMARY KEY, body text);
         INSERT INTO t SELECT g, repeat(md5(g::text), 64) FROM generate_series(1, 300) g",
        "",
        "max_batch_bytes = 8192",
    )
    .await;
    let mut daemon = Daemon::start(&cl.config, "batchbytes");
    let addr = admin_addr(&mut daemon).await;
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    let records = metric_sum(&addr, "bitclone9_sink_batch_records_sum", "").await;
    let batches = metric_sum(&addr, "bitclone9_sink_batch_records_count", "").await;
    assert!(records >= 300.0, "the sink applied {records} records");
    assert!(
        records / batches <= 5.0,
        "{records} records in {batches} batches: more than 8 KB of 2 KB rows in a batch"
    );
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

/// The number of records in every partition of `topic` (sum of high watermarks).
fn topic_records(topic: &str) -> i64 {
    let s = stack();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("group.id", unique("bc9count"))
        .create()
        .expect("consumer");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = meta.topics()[0].partitions().len() as i32;
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_a_table_repairs_the_target_while_changes_keep_flowing() {
    let cl = Clone::with_partitions(
        "skresync",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE other (id int PRIMARY KEY);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g;
         INSERT INTO other SELECT generate_series(1, 50);",
        "",
        "",
        3,
    )
    .await;
    // A fixed admin port, so that the CLI finds the running daemon.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let text = std::fs::read_to_string(&cl.config)
        .expect("read")
        .replace("[admin]", "[admin]\ntoken = \"resync-token\"")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
    std::fs::write(&cl.config, text).expect("write");
    let token = Some("resync-token");
    let db = cl.spec.db.clone();
    let tables = [("t", "id"), ("other", "id")];
    let mut daemon = Daemon::start(&cl.config, "resync");
    let addr = admin_addr(&mut daemon).await;
    wait_equal(&cl, &tables, Duration::from_secs(90)).await;
    let other_records = topic_records(&cl.spec.topic("other"));

    // Damage behind the sink's back: lost, changed and extra rows.
    cl.dst
        .batch_execute(
            "DELETE FROM t WHERE id % 10 = 0;
             UPDATE t SET v = 'tampered' WHERE id % 7 = 0;
             INSERT INTO t SELECT g, 'ghost' FROM generate_series(100001, 100010) g;",
        )
        .await
        .expect("tamper");

    // Refusals: no token, a sink, a table the source does not capture, a bad name.
    let resync_t = format!("/connectors/{db}/tables/public.t/resync");
    let (code, _) = http_request(&addr, "POST", &resync_t, None).await;
    assert_eq!(code, 401, "resync needs the token");
    for (path, want, says) in [
        (
            format!("/connectors/{}/tables/public.t/resync", cl.sink()),
            400,
            "is a sink",
        ),
        (
            format!("/connectors/{db}/tables/public.nope/resync"),
            404,
            "public.nope is not captured",
        ),
        (
            format!("/connectors/{db}/tables/.t/resync"),
            400,
            "not a table name",
        ),
    ] {
        let (code, body) = http_request(&addr, "POST", &path, token).await;
        assert_eq!(code, want, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }

    // Changes keep coming while the table is read again: each must land in order with it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = {
        let db = db.clone();
        tokio::spawn(async move {
            let s = stack();
            let c = connect(&db, &s.pg_user, &s.pg_password).await;
            let mut round = 0i64;
            while !*stop_rx.borrow() {
                round += 1;
                c.batch_execute(&format!(
                    "BEGIN;
                     UPDATE t SET v = 'load {round}' WHERE id % 50 = {m};
                     INSERT INTO t VALUES (5000 + {round}, 'new');
                     DELETE FROM t WHERE id = 4000 + {round};
                     INSERT INTO t VALUES (4000 + {round} + 1, 'later deleted');
                     COMMIT;",
                    m = round % 50
                ))
                .await
                .expect("load");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = http_request(&addr, "POST", &resync_t, token).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("resync of public.t started"), "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).expect("stop load");
    load.await.expect("load task");
    wait_equal(&cl, &tables, Duration::from_secs(90)).await;
    daemon
        .wait_log("resync delivered", Duration::from_secs(30))
        .await;
    assert_eq!(
        topic_records(&cl.spec.topic("other")),
        other_records,
        "only the asked table is read again"
    );
    let temp_slots: i64 = admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1 AND slot_name LIKE '%\\_resync'",
            &[&db],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(temp_slots, 0, "the resync's temporary slot is gone");
    let (_, metrics) = http_get(&addr, "/metrics", token).await;
    let m = parse_prometheus(&metrics);
    assert_eq!(
        m.get(&format!(
            "bitclone9_source_resyncs_total{{connector=\"{db}\"}}"
        )),
        Some(&1.0),
        "{metrics}"
    );

    // A resync asked for while the source is paused is kept and runs when it resumes.
    let (code, body) = http_request(&addr, "POST", &format!("/connectors/{db}/pause"), token).await;
    assert_eq!(code, 200, "{body}");
    cl.dst
        .batch_execute("DELETE FROM t WHERE id < 100")
        .await
        .expect("tamper again");
    let (code, body) = http_request(&addr, "POST", &resync_t, token).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("runs when"), "{body}");
    let (code, body) =
        http_request(&addr, "POST", &format!("/connectors/{db}/resume"), token).await;
    assert_eq!(code, 200, "{body}");
    wait_equal(&cl, &tables, Duration::from_secs(90)).await;
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("bitclone9::audit")
            && l.contains("action=\"resync\"")
            && l.contains("table=public.t")),
        "audit line for the resync:\n{log}"
    );
    // The CLI goes through the running daemon...
    cl.dst
        .batch_execute("UPDATE t SET v = 'cli' WHERE id < 50")
        .await
        .expect("tamper");
    let (code, out) = cli(
        &cl.config,
        &["resync", "--source", &db, "--table", "public.t"],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("resync of public.t started"), "{out}");
    wait_equal(&cl, &tables, Duration::from_secs(90)).await;
    assert_eq!(daemon.terminate(), Some(0));
    // ...or, with the daemon down, records the request for its next start.
    let (code, out) = cli(
        &cl.config,
        &["resync", "--source", &db, "--table", "public.nope"],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not captured"), "{out}");
    cl.dst
        .batch_execute("DELETE FROM t WHERE id > 2000")
        .await
        .expect("tamper");
    let (code, out) = cli(
        &cl.config,
        &["resync", "--source", &db, "--table", "t"],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("recorded: it runs when the daemon next starts"),
        "{out}"
    );
    let mut daemon = Daemon::start(&cl.config, "resync2");
    wait_equal(&cl, &tables, Duration::from_secs(90)).await;
    daemon
        .wait_log("resync delivered", Duration::from_secs(30))
        .await;
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

/// Points a clone's config at the stack's SASL_SSL listener and HTTPS registry: Kafka with
/// SCRAM-SHA-512 (password from `${KAFKA_PW}`), the registry with basic auth (`${REGISTRY_PW}`),
/// both trusting `ca`.
fn secure_kafka(config: &std::path::Path, ca: &str) {
    let s = stack();
    let secure_bootstrap = env_or("BC9_KAFKA_SECURE_BOOTSTRAP", "127.0.0.1:9094");
    let secure_registry = env_or(
        "BC9_REGISTRY_SECURE_URL",
        "https://localhost:8443/apis/ccompat/v7",
    );
    let text = std::fs::read_to_string(config)
        .expect("read config")
        .replace(
            &format!("bootstrap_servers = \"{}\"", s.bootstrap),
            &format!("bootstrap_servers = \"{secure_bootstrap}\""),
        )
        .replace(
            &format!("schema_registry_url = \"{}\"", s.registry_url),
            &format!(
                r#"schema_registry_url = "{secure_registry}"
request_timeout = "4s"
[kafka.tls]
ca_file = "{ca}"
[kafka.sasl]
mechanism = "SCRAM-SHA-512"
username = "{kafka_user}"
password = "${{KAFKA_PW}}"
[kafka.schema_registry]
username = "{registry_user}"
password = "${{REGISTRY_PW}}"
[kafka.schema_registry.tls]
ca_file = "{ca}""#,
                kafka_user = env_or("BC9_KAFKA_SASL_USER", "bitclone9"),
                registry_user = env_or("BC9_REGISTRY_USER", "bitclone9"),
            ),
        );
    std::fs::write(config, text).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_runs_over_kafka_sasl_ssl_and_an_https_registry_with_basic_auth() {
    let cl = Clone::new(
        "sksecure",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g;",
        "",
        "",
    )
    .await;
    let ca = env_or(
        "BC9_TLS_CA",
        &format!(
            "{}/.stack/tls/ca.pem",
            env!("CARGO_MANIFEST_DIR").trim_end_matches("/daemon")
        ),
    );
    secure_kafka(&cl.config, &ca);
    let kafka_pw = env_or("BC9_KAFKA_SASL_PASSWORD", "bitclone9-kafka-secret");
    let registry_pw = env_or("BC9_REGISTRY_PASSWORD", "bitclone9-registry-secret");
    let secrets = [
        ("KAFKA_PW", kafka_pw.as_str()),
        ("REGISTRY_PW", registry_pw.as_str()),
    ];

    let (code, out) = cli(&cl.config, &["check", "--connect"], &secrets);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(":9094: ok"), "{out}");
    assert!(out.contains("schema registry https://"), "{out}");

    // Source (producer, topic admin, registry writes) and sink (consumer, registry reads,
    // dead-letter topic) all go through the secured endpoints only.
    let mut daemon = Daemon::start_with(&cl.config, "secure", &secrets);
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    cl.src
        .batch_execute("UPDATE t SET v = 'changed' WHERE id <= 10; DELETE FROM t WHERE id > 490")
        .await
        .expect("changes");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(60)).await;
    assert_eq!(daemon.terminate(), Some(0));
    let log = daemon.log_text();

    // Refusals name their cause: a CA that did not sign the servers' certificates, a wrong
    // Kafka password, a wrong registry password.
    let dir = cl.config.parent().expect("dir").to_path_buf();
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=Some other CA",
        ])
        .arg("-keyout")
        .arg(dir.join("wrong.key"))
        .arg("-out")
        .arg(dir.join("wrong.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let good = std::fs::read_to_string(&cl.config).expect("read");
    let wrong_ca = dir.join("wrong-ca.toml");
    std::fs::write(
        &wrong_ca,
        good.replace(&ca, &dir.join("wrong.pem").to_string_lossy()),
    )
    .expect("write");
    let (code, out_ca) = cli(&wrong_ca, &["check", "--connect"], &secrets);
    assert_eq!(code, Some(1), "{out_ca}");
    assert!(
        out_ca.contains("kafka 127.0.0.1:9094: FAILED")
            && out_ca.contains("certificate verify failed"),
        "the Kafka TLS failure names the certificate check: {out_ca}"
    );
    assert!(
        out_ca
            .lines()
            .any(|l| l.starts_with("schema registry https://")
                && l.contains("FAILED")
                && l.to_lowercase().contains("certificate")),
        "the registry TLS failure names the certificate: {out_ca}"
    );
    let (code, out_pw) = cli(
        &cl.config,
        &["check", "--connect"],
        &[
            ("KAFKA_PW", "not-the-password"),
            ("REGISTRY_PW", "not-the-password-either"),
        ],
    );
    assert_eq!(code, Some(1), "{out_pw}");
    assert!(
        out_pw.contains("kafka 127.0.0.1:9094: FAILED") && out_pw.contains("Authentication failed"),
        "the Kafka login failure says so: {out_pw}"
    );
    assert!(
        out_pw
            .lines()
            .any(|l| l.starts_with("schema registry https://")
                && l.contains("FAILED")
                && l.contains("401")),
        "the registry login failure says so: {out_pw}"
    );
    for secret in [kafka_pw.as_str(), registry_pw.as_str(), "not-the-password"] {
        for (what, text) in [
            ("log", &log),
            ("check", &out),
            ("check wrong CA", &out_ca),
            ("check wrong password", &out_pw),
        ] {
            assert!(
                !text.contains(secret),
                "a secret appears in the {what} output"
            );
        }
    }
    cl.cleanup().await;
}

/// An OTLP/HTTP receiver on loopback: decodes each export (protobuf, the OpenTelemetry
/// protocol's own message types) and keeps it.
async fn otlp_receiver() -> (
    String,
    std::sync::Arc<
        std::sync::Mutex<
            Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
        >,
    >,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message as _;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                keep.lock().expect("lock").push(req);
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_source_and_sink_batches_are_exported_over_otlp() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    let cl = Clone::new(
        "skotel",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 200) g;",
        "",
        "",
    )
    .await;
    let (endpoint, got) = otlp_receiver().await;
    let text = std::fs::read_to_string(&cl.config).expect("read").replace(
        "[admin]",
        &format!(
            "[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"bc9-test\"\n[admin]"
        ),
    );
    std::fs::write(&cl.config, text).expect("write");
    let mut daemon = Daemon::start(&cl.config, "otel");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(90)).await;
    cl.src
        .batch_execute("UPDATE t SET v = 'x' WHERE id = 1")
        .await
        .expect("update");
    wait_equal(&cl, &[("t", "id")], Duration::from_secs(60)).await;
    // A clean stop flushes the spans still queued.
    assert_eq!(daemon.terminate(), Some(0));

    let exports = got.lock().expect("lock").clone();
    let mut spans = Vec::new();
    for e in &exports {
        for rs in &e.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| v.value.clone());
            assert_eq!(service, Some(V::StringValue("bc9-test".into())));
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let attr = |s: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| -> Option<String> {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(V::StringValue(s)) => Some(s.clone()),
                Some(V::IntValue(i)) => Some(i.to_string()),
                _ => None,
            })
    };
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let db = &cl.spec.db;
    assert!(
        !names.contains(&"source") && !names.contains(&"sink"),
        "a connector run's span (as long as the run) is not exported: {names:?}"
    );
    let batch = spans
        .iter()
        .find(|s| s.name == "source_batch" && attr(s, "lsn").is_some())
        .unwrap_or_else(|| panic!("a source batch span with its LSN: {names:?}"));
    assert_eq!(attr(batch, "connector").as_deref(), Some(db.as_str()));
    assert!(
        spans
            .iter()
            .filter(|s| s.name == "source_batch" || s.name == "sink_apply")
            .all(|s| s.parent_span_id.is_empty()),
        "each batch is a trace of its own"
    );
    let apply = spans
        .iter()
        .find(|s| s.name == "sink_apply")
        .unwrap_or_else(|| panic!("a sink batch span: {names:?}"));
    assert_eq!(attr(apply, "connector"), Some(cl.sink()));
    let offsets = attr(apply, "offsets").expect("offsets");
    assert!(
        offsets.contains(&format!("{}[0]:", cl.spec.topic("t"))),
        "{offsets}"
    );
    assert!(attr(apply, "records").is_some() && attr(apply, "lsn").is_some());
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_asked_for_during_the_snapshot_waits_for_it_instead_of_restarting_it() {
    let cl = Clone::new(
        "skresnap",
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 200000) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;",
        "",
        "",
    )
    .await;
    let text = std::fs::read_to_string(&cl.config)
        .expect("read")
        .replace("[admin]", "[admin]\ntoken = \"snap-token\"");
    std::fs::write(&cl.config, text).expect("write");
    let mut daemon = Daemon::start(&cl.config, "resnap");
    let addr = admin_addr(&mut daemon).await;
    let token = Some("snap-token");
    let db = cl.spec.db.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = http_get(&addr, "/status", token).await;
        let v: serde_json::Value = serde_json::from_str(&status).expect("json");
        if v["connectors"][&db]["state"] == "snapshotting" {
            break;
        }
        assert!(Instant::now() < deadline, "never snapshotting: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While `a` (200,000 rows) is read, a lock on `b` makes the snapshot wait at `b` for as
    // long as the test wants.
    let s = stack();
    let locker = connect(&cl.spec.db, &s.pg_user, &s.pg_password).await;
    locker
        .batch_execute("SET lock_timeout = '5s'; BEGIN; LOCK TABLE b IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let (code, body) = http_request(
        &addr,
        "POST",
        &format!("/connectors/{db}/tables/public.b/resync"),
        token,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("runs once the snapshot in progress ends"),
        "{body}"
    );
    locker.batch_execute("COMMIT").await.expect("unlock");
    daemon
        .wait_log("resync delivered", Duration::from_secs(60))
        .await;
    wait_equal(&cl, &[("a", "id"), ("b", "id")], Duration::from_secs(60)).await;
    let log = daemon.log_text();
    assert_eq!(
        log.matches("created replication slot").count(),
        1,
        "the snapshot in progress was not thrown away:\n{log}"
    );
    assert!(
        log.contains("more tables to read again were asked for meanwhile"),
        "{log}"
    );
    assert_eq!(daemon.terminate(), Some(0));

    // Compacted topics cannot carry the truncate a resync opens with: refused.
    let compacted = cl.config.with_file_name("compacted.toml");
    std::fs::write(
        &compacted,
        std::fs::read_to_string(&cl.config).expect("read").replace(
            "partitions = 1",
            "partitions = 1\ncleanup_policy = \"compact\"",
        ),
    )
    .expect("write");
    let (code, out) = cli(
        &compacted,
        &["resync", "--source", &db, "--table", "a"],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("compacted topics"), "{out}");
    cl.cleanup().await;
}

/// Values the native Avro types cannot hold (NaN in numeric(p,s), arrays with more
/// dimensions, other lower bounds or such elements) reach the target unchanged, in keys too; a
/// value nothing can carry stops the source and says so on /status, in a metric and in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_in_text_form_are_cloned_and_an_unreadable_one_is_reported() {
    let ddl = "
CREATE TABLE odd (k numeric(10,2) PRIMARY KEY, n numeric(10,2), a int[], d numeric(5,1)[], ts timestamp);
INSERT INTO odd VALUES
  (1, 'NaN', '{{1,2},{3,4}}', '{1.5,NaN}', '2024-01-01'),
  (2, 7.5, '[0:2]={7,8,9}', '{2.5}', NULL),
  ('NaN', 'NaN', '{}', '{{1.0},{NULL}}', NULL),
  (4, 3.25, '{5,NULL}', NULL, NULL);";
    let cl = Clone::new("sktext", ddl, "", "").await;
    let tables = [("odd", "k")];
    let mut daemon = Daemon::start(&cl.config, "text-form");
    daemon
        .wait_log("streaming started", Duration::from_secs(120))
        .await;
    wait_equal(&cl, &tables, Duration::from_secs(60)).await;
    // Streamed: inserts, updates into and out of text form, a key change from and to NaN.
    cl.src
        .batch_execute(
            "INSERT INTO odd VALUES (5, 'NaN', '[-1:-1][1:2]={{6,7}}', '{NaN}', NULL);
             UPDATE odd SET n = 'NaN', a = '{1}' WHERE k = 2;
             UPDATE odd SET n = 4.5, a = '{{8}}' WHERE k = 1;
             UPDATE odd SET k = 3 WHERE k = 'NaN';
             UPDATE odd SET k = 'NaN' WHERE k = 4;
             DELETE FROM odd WHERE k = 5;
             INSERT INTO odd VALUES (5, 1, '{}', '{}', NULL);",
        )
        .await
        .expect("stream");
    wait_equal(&cl, &tables, Duration::from_secs(60)).await;
    let got: Vec<String> = cl
        .dst
        .query(
            "SELECT k::text || ' ' || coalesce(a::text, '-') FROM odd ORDER BY k",
            &[],
        )
        .await
        .expect("target")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        got,
        [
            "1.00 {{8}}",
            "2.00 {1}",
            "3.00 {}",
            "5.00 {}",
            "NaN {5,NULL}"
        ],
        "dimensions and bounds survive"
    );
    let (code, out) = cli(&cl.config, &["verify"], &[]);
    assert_eq!(code, Some(0), "verify: {out}");

    // A timestamp beyond 64 bits of microseconds since 1970 fits no field type.
    cl.src
        .batch_execute("INSERT INTO odd (k, ts) VALUES (9, '294270-01-01 00:00:00')")
        .await
        .expect("insert");
    let addr = admin_addr(&mut daemon).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(&addr, "/status", None).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        let err = v["connectors"][&cl.spec.db]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if err.contains("table public.odd, column ts") && err.contains("294270-01-01") {
            break;
        }
        assert!(Instant::now() < deadline, "status: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, metrics) = http_get(&addr, "/metrics", None).await;
    let stops: f64 = parse_prometheus(&metrics)
        .iter()
        .filter(|(k, _)| {
            k.starts_with("bitclone9_source_unreadable_values_total")
                && k.contains(r#"table="public.odd""#)
                && k.contains(r#"column="ts""#)
        })
        .map(|(_, v)| v)
        .sum();
    assert!(stops >= 1.0, "{metrics}");
    assert!(daemon.log_text().contains("column ts"));
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}

/// A table created while the clone streams, matching `include`, is added to the publication and
/// read (rows written before it was found, and while it was read, included) without a restart
/// of the daemon, while the other tables keep streaming; a table created while the daemon is
/// down is added at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_later_are_added_and_cloned_while_streaming() {
    let cl = Clone::new(
        "sknewtab",
        "CREATE TABLE first (id int PRIMARY KEY, v text); INSERT INTO first SELECT g, 'a' FROM generate_series(1, 50) g;",
        "",
        "",
    )
    .await;
    let text = std::fs::read_to_string(&cl.config).expect("config");
    std::fs::write(
        &cl.config,
        text.replacen(
            "status_interval = \"200ms\"",
            "status_interval = \"200ms\"\nnew_table_check_interval = \"1s\"",
            1,
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&cl.config, "new-tables");
    daemon
        .wait_log("streaming started", Duration::from_secs(120))
        .await;
    wait_equal(&cl, &[("first", "id")], Duration::from_secs(60)).await;
    // Created and written while streaming; written again while it is being found and read.
    cl.src
        .batch_execute(
            "CREATE TABLE later (id int PRIMARY KEY, v text);
             INSERT INTO later SELECT g, 'before' FROM generate_series(1, 200) g;",
        )
        .await
        .expect("create");
    for round in 0..20 {
        cl.src
            .batch_execute(&format!(
                "UPDATE later SET v = 'round {round}' WHERE id % 20 = {round};
                 INSERT INTO later VALUES ({}, 'new');
                 UPDATE first SET v = 'round {round}' WHERE id = {};",
                1000 + round,
                round + 1
            ))
            .await
            .expect("writes");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_equal(
        &cl,
        &[("first", "id"), ("later", "id")],
        Duration::from_secs(90),
    )
    .await;
    daemon
        .wait_log(
            "new tables matching include added to the publication",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        daemon.is_running(),
        "the daemon did not restart: only the source's run did"
    );
    // A new table that cannot be captured (no key) is named and left out; the rest streams on.
    cl.src
        .batch_execute(
            "CREATE TABLE keyless (v text); INSERT INTO keyless VALUES ('x');
             UPDATE first SET v = 'after keyless' WHERE id = 50;",
        )
        .await
        .expect("keyless");
    daemon
        .wait_log(
            "table public.keyless is left out: it has no primary key or replica identity",
            Duration::from_secs(30),
        )
        .await;
    wait_equal(
        &cl,
        &[("first", "id"), ("later", "id")],
        Duration::from_secs(30),
    )
    .await;
    cl.src
        .batch_execute("DROP TABLE keyless")
        .await
        .expect("drop keyless");

    // Created while the daemon is down: added at the next start.
    assert_eq!(daemon.terminate(), Some(0));
    cl.src
        .batch_execute(
            "CREATE TABLE offline (id int PRIMARY KEY, v text);
             INSERT INTO offline SELECT g, 'x' FROM generate_series(1, 30) g;
             DELETE FROM later WHERE id < 10;",
        )
        .await
        .expect("offline");
    let mut daemon = Daemon::start(&cl.config, "new-tables-2");
    wait_equal(
        &cl,
        &[("first", "id"), ("later", "id"), ("offline", "id")],
        Duration::from_secs(90),
    )
    .await;
    let (code, out) = cli(&cl.config, &["verify"], &[]);
    assert_eq!(code, Some(0), "verify: {out}");
    assert!(out.contains("all 3 table(s) equal"), "{out}");
    assert_eq!(daemon.terminate(), Some(0));
    cl.cleanup().await;
}
