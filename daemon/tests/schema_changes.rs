//! Schema and table changes at the source on the real stack: what the registry's compatibility
//! rule does to a change it refuses, under each `on_incompatible_schema` setting; tables
//! dropped at the source, and tables the config stops matching.

mod common;

use common::clone::wait_same;
use common::*;
use std::time::{Duration, Instant};

/// A request to the registry's Confluent API; returns the body.
fn registry(method: &str, path: &str, body: Option<&str>) -> String {
    let url = format!("{}/{path}", stack().registry_url.trim_end_matches('/'));
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-X", method, &url]);
    cmd.args(["-H", "Content-Type: application/vnd.schemaregistry.v1+json"]);
    if let Some(b) = body {
        cmd.args(["-d", b]);
    }
    let out = cmd.output().expect("curl runs");
    assert!(out.status.success(), "curl {method} {url}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `qty` values of the events of `topic` with key `id`.
fn qty_of(records: &[Record], id: i64) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.key_long("id") == Some(id))
        .filter_map(|r| r.row("after"))
        .map(|row| format!("{:?}", row.get("qty")))
        .collect()
}

async fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics", None).await;
    parse_prometheus(&body)
        .into_iter()
        .find(|(k, _)| k.starts_with(name))
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_type_change_stops_the_source_with_the_fix_and_it_goes_on_once_allowed() {
    let (db, client) = db_with(
        "incompat",
        "CREATE TABLE t (id bigint PRIMARY KEY, qty integer);
         INSERT INTO t SELECT g, g FROM generate_series(1, 10) g",
    )
    .await;
    let spec = SourceSpec::new(&db);
    let topic = spec.topic("t");
    let subject = format!("{topic}-value");
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "incompat").await;
    let addr = admin_addr(&mut daemon).await;
    let got = consume(&topic, 10, Duration::from_secs(1), Duration::from_secs(60)).await;
    assert!(got.len() >= 10, "snapshot rows: {}", got.len());

    // integer → text breaks BACKWARD (the stack's rule): a reader of string cannot read int.
    client
        .batch_execute(
            "ALTER TABLE t ALTER COLUMN qty TYPE text;
             INSERT INTO t VALUES (100, 'a hundred')",
        )
        .await
        .expect("alter");
    let lsn_after = current_lsn(&admin_in(&db).await).await;
    daemon
        .wait_log(
            "breaks the BACKWARD compatibility rule of subject",
            Duration::from_secs(60),
        )
        .await;
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("breaks the BACKWARD compatibility rule"))
        .expect("the error line");
    for part in [
        "table public.t",
        subject.as_str(),
        r#"column \"qty\": int → string"#,
        "on_incompatible_schema",
        "/config/",
    ] {
        assert!(
            line.contains(part) || line.contains(&part.replace("\\\"", "\"")),
            "the error names {part}: {line}"
        );
    }
    let (_, status) = http_get(&addr, "/status", None).await;
    assert!(
        status.contains(&subject) && status.contains("compatibility rule"),
        "/status says why: {status}"
    );
    assert_eq!(
        metric(
            &addr,
            &format!("bitclone9_schema_incompatible{{connector=\"{db}\",subject=\"{subject}\"}}")
        )
        .await,
        Some(1.0),
        "the gauge is up while stopped"
    );
    // Nothing of the new shape went out, and the slot was not confirmed past it.
    let now = consume(&topic, 11, Duration::from_secs(1), Duration::from_secs(5)).await;
    assert!(qty_of(&now, 100).is_empty(), "no event of the new shape");
    let confirmed = confirmed_flush(&admin_in(&db).await, &db)
        .await
        .unwrap_or(0);
    assert!(
        confirmed < lsn_after,
        "slot confirmed {confirmed} past the change at {lsn_after}"
    );

    // The operator lets the subject take it; the source goes on by itself.
    registry(
        "PUT",
        &format!("config/{subject}"),
        Some(r#"{"compatibility":"NONE"}"#),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = consume(&topic, 11, Duration::from_secs(1), Duration::from_secs(10)).await;
        let q = qty_of(&now, 100);
        if !q.is_empty() {
            assert_eq!(q, vec![r#"Some(String("a hundred"))"#.to_string()]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source did not go on: {}",
            daemon.log_text()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &addr,
        &format!("bitclone9_schema_incompatible{{connector=\"{db}\",subject=\"{subject}\"}}"),
    )
    .await
        != Some(0.0)
    {
        assert!(Instant::now() < deadline, "the gauge stays up");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(daemon);
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_setting_registers_an_incompatible_change_and_nothing_stops() {
    let (db, client) = db_with(
        "newver",
        "CREATE TABLE t (id bigint PRIMARY KEY, qty integer);
         INSERT INTO t VALUES (1, 1)",
    )
    .await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = "[sources.X.topics]\non_incompatible_schema = \"new_version\"\n".replace("X", &db);
    let topic = spec.topic("t");
    let subject = format!("{topic}-value");
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "newver").await;
    let addr = admin_addr(&mut daemon).await;
    consume(&topic, 1, Duration::from_secs(1), Duration::from_secs(60)).await;
    client
        .batch_execute(
            "ALTER TABLE t ALTER COLUMN qty TYPE text;
             INSERT INTO t VALUES (2, 'two')",
        )
        .await
        .expect("alter");
    let got = consume(&topic, 2, Duration::from_secs(1), Duration::from_secs(60)).await;
    assert_eq!(qty_of(&got, 2), vec![r#"Some(String("two"))"#.to_string()]);
    assert_eq!(qty_of(&got, 1), vec!["Some(Int(1))".to_string()]);
    assert!(
        daemon
            .log_text()
            .contains("breaks the subject's compatibility rule"),
        "the forced version is logged"
    );
    assert_eq!(
        metric(&addr, &format!("bitclone9_schema_forced_versions_total{{connector=\"{db}\",subject=\"{subject}\"}}")).await,
        Some(1.0)
    );
    // The subject's rule is back as it was, and it holds two versions.
    let config = registry(
        "GET",
        &format!("config/{subject}?defaultToGlobal=true"),
        None,
    );
    assert!(
        config.contains("BACKWARD"),
        "subject rule put back: {config}"
    );
    let versions = registry("GET", &format!("subjects/{subject}/versions"), None);
    assert_eq!(versions.trim(), "[1,2]", "versions of {subject}");
    drop(daemon);
    cleanup(&db).await;
}

async fn publication_tables(db: &str) -> Vec<String> {
    admin_in(db)
        .await
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&format!("bitclone9_{db}")],
        )
        .await
        .expect("publication tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_is_reported_and_a_table_the_config_no_longer_matches_leaves_the_publication(
) {
    let (db, client) = db_with(
        "dropped",
        "CREATE TABLE keep (id bigint PRIMARY KEY, v text);
         CREATE TABLE gone (id bigint PRIMARY KEY, v text);
         CREATE TABLE later_excluded (id bigint PRIMARY KEY, v text);
         INSERT INTO gone VALUES (1, 'x')",
    )
    .await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = "new_table_check_interval = \"1s\"\n".into();
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_streaming(&cfg, "dropped").await;
    let addr = admin_addr(&mut daemon).await;
    assert_eq!(
        publication_tables(&db).await,
        ["gone", "keep", "later_excluded"]
    );

    client.batch_execute("DROP TABLE gone").await.expect("drop");
    daemon
        .wait_log("tables dropped at the source", Duration::from_secs(30))
        .await;
    assert!(
        daemon.log_text().contains("public.gone"),
        "the log names the table"
    );
    let (_, status) = http_get(&addr, "/status", None).await;
    assert!(
        status.contains("table public.gone was dropped at the source"),
        "/status notes it: {status}"
    );
    assert_eq!(
        metric(
            &addr,
            &format!("bitclone9_source_tables_dropped_total{{connector=\"{db}\"}}")
        )
        .await,
        Some(1.0)
    );
    // The others keep flowing.
    client
        .batch_execute("INSERT INTO keep VALUES (1, 'after the drop')")
        .await
        .expect("insert");
    let got = consume(
        &spec.topic("keep"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        got.iter()
            .filter(|r| r.op().as_deref() == Some("c"))
            .count(),
        1,
        "keep still streams"
    );
    assert!(daemon.is_running());

    // The config stops matching a table and is reloaded (SIGHUP): the source's new run takes it
    // out of the publication, so the server stops decoding its changes for this slot.
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replacen(
            "new_table_check_interval",
            "exclude = [\"public.later_excluded\"]\nnew_table_check_interval",
            1,
        ),
    )
    .expect("config");
    send_signal("-HUP", daemon.child.id());
    daemon
        .wait_log(
            "tables no longer matching include/exclude removed from the publication",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(publication_tables(&db).await, ["keep"]);
    daemon.terminate();
    cleanup(&db).await;
}

async fn column_types(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String, bool)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
          WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attname",
        &[&table],
    )
    .await
    .expect("columns")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_renamed_retyped_and_dropped_at_the_source_are_followed_in_the_target() {
    follow_column_changes("skddl", "").await;
}

/// The same with two target sessions applying each batch's partitions at once, in small
/// batches: a session that meets the column change first changes the table, and the other
/// one, whose statements the change made wrong, rolls back and applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_changes_are_followed_with_concurrent_apply_sessions() {
    follow_column_changes("skddlconc", "apply_concurrency = 2\nmax_batch_events = 20").await;
}

async fn follow_column_changes(prefix: &str, sink_extra: &str) {
    let cl = common::clone::Clone::with_partitions(
        prefix,
        "CREATE TABLE t (id int PRIMARY KEY, a text, n integer, gone text NOT NULL DEFAULT 'g', big integer);
         INSERT INTO t SELECT g, 'a' || g, g, 'gone' || g, g FROM generate_series(1, 200) g",
        "",
        sink_extra,
        2,
    )
    .await;
    // integer → text breaks the registry's BACKWARD rule: let it through as a new version.
    let text = std::fs::read_to_string(&cl.config).expect("config");
    std::fs::write(
        &cl.config,
        text.replacen(
            "partitions = 2\n",
            "partitions = 2\non_incompatible_schema = \"new_version\"\n",
            1,
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&cl.config, "ddl");
    let all = "SELECT id, a, n, gone, big FROM t ORDER BY id";
    wait_same(&cl, all, Duration::from_secs(90)).await;

    // Each change is followed at once by writes of the new shape, while the other partition
    // may still hold events of the old one.
    cl.src
        .batch_execute(
            "ALTER TABLE t RENAME COLUMN a TO a2;
             UPDATE t SET a2 = a2 || '!' WHERE id % 3 = 0;
             INSERT INTO t (id, a2, n, gone, big) VALUES (201, 'new', 201, 'x', 201);
             ALTER TABLE t ALTER COLUMN n TYPE bigint;
             UPDATE t SET n = 3000000000 + id WHERE id <= 10;
             ALTER TABLE t DROP COLUMN gone;
             INSERT INTO t (id, a2, n, big) VALUES (202, 'after drop', 1, 202);
             UPDATE t SET a2 = 'changed after drop' WHERE id = 7;
             ALTER TABLE t ALTER COLUMN big TYPE text;
             UPDATE t SET big = 'word' WHERE id = 5;
             INSERT INTO t (id, a2, n, big) VALUES (203, 'last', 2, 'text now');",
        )
        .await
        .expect("ddl");
    wait_same(
        &cl,
        "SELECT id, a2, n, big FROM t ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    let target = column_types(&cl.dst, "t").await;
    assert_eq!(
        target,
        vec![
            ("a2".to_string(), "text".to_string(), false),
            ("big".to_string(), "text".to_string(), false),
            ("gone".to_string(), "text".to_string(), false),
            ("id".to_string(), "integer".to_string(), true),
            ("n".to_string(), "bigint".to_string(), false),
        ],
        "renamed (not added), retyped, and the dropped column kept and nullable"
    );
    let kept: Vec<(i32, Option<String>)> = cl
        .dst
        .query(
            "SELECT id, gone FROM t WHERE id IN (1, 201, 202) ORDER BY id",
            &[],
        )
        .await
        .expect("kept column")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kept,
        vec![
            (1, Some("gone1".into())),
            (201, Some("x".into())),
            (202, None)
        ],
        "the dropped column keeps its values; rows written after the drop have none"
    );
    assert!(
        !daemon.log_text().contains("dead letter"),
        "nothing was dead-lettered"
    );
    assert!(daemon
        .log_text()
        .contains("followed a column change of the source"));
    let _ = admin_addr(&mut daemon).await;
    drop(daemon);
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_column_drop_drop_removes_the_target_column() {
    let cl = common::clone::Clone::new(
        "skdropcol",
        "CREATE TABLE t (id int PRIMARY KEY, a text, gone text);
         INSERT INTO t SELECT g, 'a' || g, 'g' FROM generate_series(1, 20) g",
        "",
        "on_column_drop = \"drop\"",
    )
    .await;
    let daemon = Daemon::start(&cl.config, "dropcol");
    wait_same(&cl, "SELECT * FROM t ORDER BY id", Duration::from_secs(90)).await;
    cl.src
        .batch_execute("ALTER TABLE t DROP COLUMN gone; INSERT INTO t VALUES (21, 'after')")
        .await
        .expect("drop column");
    wait_same(&cl, "SELECT * FROM t ORDER BY id", Duration::from_secs(90)).await;
    let names: Vec<String> = column_types(&cl.dst, "t")
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(names, ["a", "id"]);
    drop(daemon);
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_the_target_cannot_cast_stops_the_sink_with_the_statement_to_run() {
    let cl = common::clone::Clone::new(
        "skcast",
        "CREATE TABLE t (id int PRIMARY KEY, a text);
         INSERT INTO t VALUES (1, 'abc'), (2, 'hello');
         CREATE TABLE u (id int PRIMARY KEY);
         INSERT INTO u VALUES (1)",
        "",
        "",
    )
    .await;
    let text = std::fs::read_to_string(&cl.config).expect("config");
    std::fs::write(
        &cl.config,
        text.replacen(
            "partitions = 1\n",
            "partitions = 1\non_incompatible_schema = \"new_version\"\n",
            1,
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&cl.config, "cast");
    wait_same(&cl, "SELECT * FROM t ORDER BY id", Duration::from_secs(90)).await;
    // The source converts with an expression the target's plain cast cannot repeat.
    cl.src
        .batch_execute(
            "ALTER TABLE t ALTER COLUMN a TYPE integer USING length(a);
             INSERT INTO t VALUES (3, 42)",
        )
        .await
        .expect("alter");
    daemon
        .wait_log("the target cannot cast its values", Duration::from_secs(60))
        .await;
    let log = daemon.log_text();
    assert!(
        log.contains(r#"ALTER TABLE \"public\".\"t\" ALTER COLUMN \"a\" TYPE integer USING"#)
            || log.contains(r#"ALTER TABLE "public"."t" ALTER COLUMN "a" TYPE integer USING"#),
        "the error says what to run: {log}"
    );
    let addr = admin_addr(&mut daemon).await;
    let (_, status) = http_get(&addr, "/status", None).await;
    assert!(
        status.contains("cannot cast its values") && status.contains("stopped_tables"),
        "/status says which table stopped and why: {status}"
    );
    assert_eq!(
        metric_sum(&addr, "bitclone9_sink_tables_stopped", "").await,
        1.0
    );
    // Only that table stopped: another one goes on.
    cl.src
        .batch_execute("INSERT INTO u SELECT g FROM generate_series(2, 50) g")
        .await
        .expect("writes to u");
    wait_same(&cl, "SELECT * FROM u ORDER BY id", Duration::from_secs(60)).await;
    // Nothing was dead-lettered or applied past the change meanwhile.
    let n: i64 = cl
        .dst
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
    // The operator runs it as the source did; the sink goes on by itself.
    cl.dst
        .batch_execute("ALTER TABLE t ALTER COLUMN a TYPE integer USING length(a)")
        .await
        .expect("operator's fix");
    wait_same(&cl, "SELECT * FROM t ORDER BY id", Duration::from_secs(120)).await;
    assert!(!daemon.log_text().contains("dead-letter topic"));
    assert!(daemon.log_text().contains("stopped tables apply again"));
    assert_eq!(
        metric_sum(&addr, "bitclone9_sink_tables_stopped", "").await,
        0.0
    );
    drop(daemon);
    cl.cleanup().await;
}

/// A type change the target cannot cast, over four partitions, read from a backlog in small
/// batches: partitions reach the change at different times. The sink applies no event of the
/// new shape before every partition has applied its events of the old one, so the operator's
/// expression converts every old value, and nothing of the old shape meets the new column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncastable_type_change_waits_for_every_partition_before_the_new_shape() {
    let cl = common::clone::Clone::with_partitions(
        "skcastparts",
        "CREATE TABLE t (id int PRIMARY KEY, code text);
         INSERT INTO t SELECT g, 'c' || g FROM generate_series(1, 400) g",
        "",
        "max_batch_events = 10",
        4,
    )
    .await;
    let text = std::fs::read_to_string(&cl.config).expect("config");
    std::fs::write(
        &cl.config,
        text.replacen(
            "partitions = 4\n",
            "partitions = 4\non_incompatible_schema = \"new_version\"\n",
            1,
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&cl.config, "castparts");
    let all = "SELECT id, code::text FROM t ORDER BY id";
    wait_same(&cl, all, Duration::from_secs(90)).await;
    assert_eq!(daemon.terminate(), Some(0));
    // A backlog: old-shape updates of every row (all partitions), the change, new-shape writes.
    cl.src
        .batch_execute(
            "UPDATE t SET code = 'c' || (id * 10);
             ALTER TABLE t ALTER COLUMN code TYPE bigint USING substr(code, 2)::bigint;
             INSERT INTO t SELECT g, g * 10 FROM generate_series(401, 500) g;
             UPDATE t SET code = code + 1 WHERE id % 7 = 0;",
        )
        .await
        .expect("writes and the change");
    // The source alone puts it all on Kafka first, so the sink meets a backlog whose
    // partitions it reads in any order.
    let end = current_lsn(&cl.src).await;
    let text = std::fs::read_to_string(&cl.config).expect("config");
    let source_only = cl.config.with_extension("source.toml");
    let cut = text.find("\n[sinks.").expect("a sink section");
    std::fs::write(&source_only, &text[..cut]).expect("source-only config");
    let mut source = Daemon::start(&source_only, "castparts-src");
    let admin = admin().await;
    let slot = format!("bitclone9_{}", cl.spec.db);
    wait_confirmed(&admin, &slot, end, Duration::from_secs(60)).await;
    assert!(
        source
            .log_text()
            .contains("column types changed: wrote a shape barrier to every partition"),
        "the source marks where the new types start"
    );
    assert_eq!(source.terminate(), Some(0));
    let mut daemon = Daemon::start(&cl.config, "castparts2");
    daemon
        .wait_log("the target cannot cast its values", Duration::from_secs(90))
        .await;
    cl.dst
        .batch_execute("ALTER TABLE t ALTER COLUMN code TYPE bigint USING substr(code, 2)::bigint")
        .await
        .expect("operator's fix");
    wait_same(&cl, all, Duration::from_secs(120)).await;
    let log = daemon.log_text();
    assert!(
        !log.contains("dead-letter topic"),
        "nothing dead-lettered: {log}"
    );
    drop(daemon);
    cl.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ddl_trigger_finds_a_new_table_without_a_catalog_poll() {
    let (db, client) = db_with("ddltrig", "CREATE TABLE a (id int PRIMARY KEY)").await;
    let s = stack();
    let mut spec = SourceSpec::new(&db);
    // No polling: only the trigger's note can find the new table while streaming.
    spec.extra = "new_table_check_interval = \"0s\"\nddl_trigger = true\n".into();
    let (cfg, _dir) = write_config(&spec, "");
    // Creating an event trigger takes a superuser.
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replacen(
            &format!("user = \"{}\"", s.pg_user),
            &format!("user = \"{}\"", s.pg_superuser),
            1,
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start_with(&cfg, "ddltrig", &[("TEST_PG_PASSWORD", &s.pg_superpass)]);
    daemon
        .wait_log("streaming started", Duration::from_secs(60))
        .await;
    let installed: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname = 'bitclone9_ddl'",
            &[],
        )
        .await
        .expect("event triggers")
        .get(0);
    assert_eq!(installed, 1, "the trigger is installed");
    client
        .batch_execute(
            "CREATE TABLE b (id int PRIMARY KEY, v text); INSERT INTO b VALUES (1, 'first')",
        )
        .await
        .expect("new table");
    let got = consume(
        &spec.topic("b"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        got.iter().any(|r| r.key_long("id") == Some(1)),
        "the new table's row arrived without a catalog poll"
    );
    assert!(daemon.log_text().contains("new tables match include"));
    drop(daemon);
    cleanup(&db).await;
}

/// ADD COLUMN with a default or identity gives every existing row a value without a row
/// change in the WAL (a stored missing value, or a rewrite of the table for a volatile
/// default): the source notices the new column and reads the table again, also when the
/// column was added while the daemon was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_with_defaults_fill_the_existing_rows_in_the_target_too() {
    let cl = common::clone::Clone::with_partitions(
        "skadddef",
        "CREATE TABLE t (id int PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 300) g;
         CREATE TABLE other (id int PRIMARY KEY, v int);
         INSERT INTO other SELECT g, g FROM generate_series(1, 50) g",
        "",
        "",
        2,
    )
    .await;
    let mut daemon = Daemon::start(&cl.config, "adddef");
    wait_same(
        &cl,
        "SELECT id, a FROM t ORDER BY id",
        Duration::from_secs(90),
    )
    .await;

    cl.src
        .batch_execute(
            // One transaction: the plain column's row change sends a Relation message of
            // its own, before the one that brings the filled columns at the same LSN.
            "ALTER TABLE t ADD COLUMN plain text;
             UPDATE t SET plain = 'p' WHERE id = 1;
             ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 7;
             ALTER TABLE t ADD COLUMN v double precision DEFAULT random();
             ALTER TABLE t ADD COLUMN ident bigint GENERATED ALWAYS AS IDENTITY;
             UPDATE t SET a = a || '!' WHERE id % 10 = 0;
             INSERT INTO t (id, a, c) VALUES (301, 'new', 8);
             UPDATE other SET v = v + 1 WHERE id <= 5;",
        )
        .await
        .expect("ddl");
    let all = "SELECT id, a, plain, c, v, ident FROM t ORDER BY id";
    wait_same(&cl, all, Duration::from_secs(120)).await;
    wait_same(
        &cl,
        "SELECT * FROM other ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    let addr = admin_addr(&mut daemon).await;
    let rewritten = metric(
        &addr,
        &format!(
            "bitclone9_source_rewritten_tables_total{{connector=\"{}\"}}",
            cl.spec.name
        ),
    )
    .await;
    assert!(rewritten >= Some(1.0), "counted: {rewritten:?}");
    assert!(daemon
        .log_text()
        .contains("gave every existing row a value the WAL does not carry"));

    // Added while the daemon is stopped: the stored shape tells it from a known column.
    daemon.terminate();
    cl.src
        .batch_execute(
            "ALTER TABLE t ADD COLUMN later text DEFAULT 'filled';
             INSERT INTO t (id, a) VALUES (302, 'after restart');",
        )
        .await
        .expect("ddl while stopped");
    let daemon = Daemon::start(&cl.config, "adddef-restart");
    wait_same(
        &cl,
        "SELECT id, a, plain, c, v, ident, later FROM t ORDER BY id",
        Duration::from_secs(120),
    )
    .await;
    drop(daemon);
    cl.cleanup().await;
}

/// A column added with a default to a table that then sees no row change sends no Relation
/// message, so only the catalog check can tell that the table's rows took a value: the table is
/// read again within a check interval, while another table keeps streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_table_given_a_column_with_a_default_is_read_again_without_a_row_change() {
    let cl = common::clone::Clone::with_partitions(
        "skidledef",
        "CREATE TABLE t (id int PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 200) g;
         CREATE TABLE busy (id int PRIMARY KEY, v int);
         INSERT INTO busy SELECT g, g FROM generate_series(1, 20) g",
        "",
        "",
        2,
    )
    .await;
    cl.set_source_option("new_table_check_interval = \"1s\"");
    let mut daemon = Daemon::start(&cl.config, "idledef");
    wait_same(
        &cl,
        "SELECT id, a FROM t ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    cl.src
        .batch_execute("ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 7")
        .await
        .expect("ddl");
    // Only the other table changes from here on.
    for i in 0..10 {
        cl.src
            .execute("UPDATE busy SET v = v + 1 WHERE id = $1", &[&(i + 1)])
            .await
            .expect("busy");
    }
    wait_same(
        &cl,
        "SELECT id, a, c FROM t ORDER BY id",
        Duration::from_secs(90),
    )
    .await;
    wait_same(
        &cl,
        "SELECT * FROM busy ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    let addr = admin_addr(&mut daemon).await;
    let rewritten = "bitclone9_source_rewritten_tables_total";
    assert_eq!(
        metric_sum(&addr, rewritten, "").await,
        1.0,
        "read again once"
    );
    assert!(daemon
        .log_text()
        .contains("gave every existing row a value the WAL does not carry"));
    // The table's first row change after the DDL describes the shape already stored: no
    // second read.
    cl.src
        .batch_execute("INSERT INTO t (id, a) VALUES (201, 'later')")
        .await
        .expect("insert");
    wait_same(
        &cl,
        "SELECT id, a, c FROM t ORDER BY id",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        metric_sum(&addr, rewritten, "").await,
        1.0,
        "not read a second time"
    );
    drop(daemon);
    cl.cleanup().await;
}
