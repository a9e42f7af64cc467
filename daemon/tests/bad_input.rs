//! Bad configuration, misconfigured servers and unreachable services: each gets a clear message
//! naming what is at fault, a documented exit code, and no crash loop.

mod common;

use common::*;
use std::time::Duration;

fn check(config_text: &str, connect: bool) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(unique("bc9cfg"));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, config_text).expect("write");
    let args: &[&str] = if connect {
        &["check", "--connect"]
    } else {
        &["check"]
    };
    cli(&path, args, &[])
}

fn good_config(db: &str, user: &str) -> String {
    let s = stack();
    format!(
        r#"[kafka]
bootstrap_servers = "{}"
schema_registry_url = "{}"
[sources.x]
type = "postgres"
host = "127.0.0.1"
port = {}
user = "{user}"
password = "${{TEST_PG_PASSWORD}}"
database = "{db}"
"#,
        s.bootstrap, s.registry_url, s.pg_port
    )
}

#[test]
fn config_errors_name_file_key_and_expectation_with_exit_2() {
    let base = good_config("postgres", "bitclone9");
    let cases = [
        (
            base.replace("TEST_PG_PASSWORD", "BC9_SURELY_UNSET_VAR"),
            vec!["sources.x.password", "BC9_SURELY_UNSET_VAR", "not set"],
        ),
        (
            format!("{base}colour = \"red\"\n"),
            vec!["sources.x.colour", "unknown field"],
        ),
        (
            base.replace(&format!("port = {}", stack().pg_port), "port = \"five\""),
            vec!["sources.x.port", "expected u16"],
        ),
        (
            format!("{base}snapshot = \"sometimes\"\n"),
            vec!["sources.x.snapshot", "initial", "never"],
        ),
        (
            format!("{base}[sources.x.topics]\npartitions = 0\n"),
            vec!["sources.x.topics.partitions", "at least 1"],
        ),
        (
            format!("{base}include = [\"orders\"]\n"),
            vec!["sources.x.include", "schema.table"],
        ),
        (
            base.replace("[kafka]", "[kafka\n"),
            vec!["bad.toml", "not valid TOML"],
        ),
    ];
    for (text, needles) in cases {
        let (code, out) = check(&text, false);
        assert_eq!(code, Some(2), "exit code 2 for: {out}");
        assert!(out.contains("bad.toml"), "names the file: {out}");
        for n in needles {
            assert!(out.contains(n), "message mentions {n:?}: {out}");
        }
    }
    let (code, out) = check(&base, false);
    assert_eq!(code, Some(0), "a good file passes: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connect_reports_each_service_and_server_misconfiguration() {
    let (db, client) = db_with("chk", "CREATE TABLE ok_table (id int PRIMARY KEY)").await;

    let (code, out) = check(&good_config(&db, &stack().pg_user), true);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("kafka")
            && out.contains("schema registry")
            && out.contains("1 table(s) to capture"),
        "{out}"
    );

    // A table whose updates could not be captured is named as left out, with the fix.
    client
        .batch_execute("CREATE TABLE no_key (v int)")
        .await
        .expect("table");
    let (code, out) = check(&good_config(&db, &stack().pg_user), true);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("1 table(s) to capture")
            && out.contains("warning: table public.no_key is left out")
            && out.contains("REPLICA IDENTITY FULL"),
        "{out}"
    );
    client
        .batch_execute("DROP TABLE no_key")
        .await
        .expect("drop");

    // A role without the replication privilege is refused with the fix.
    let role = unique("norepl");
    admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{}'",
            stack().pg_password
        ))
        .await
        .expect("role");
    let (code, out) = check(&good_config(&db, &role), true);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("ALTER ROLE \"{role}\" REPLICATION")),
        "{out}"
    );

    // Unreachable services are named.
    let s = stack();
    let broken = good_config(&db, &s.pg_user)
        .replace(&s.bootstrap, "127.0.0.1:1")
        .replace(&s.registry_url, "http://127.0.0.1:1/apis/ccompat/v7")
        .replace(&format!("port = {}", s.pg_port), "port = 1")
        .replace("[kafka]", "[kafka]\nrequest_timeout = \"2s\"");
    let (code, out) = check(&broken, true);
    assert_eq!(code, Some(1), "{out}");
    for needle in [
        "kafka 127.0.0.1:1: FAILED",
        "schema registry http://127.0.0.1:1/apis/ccompat/v7: FAILED",
        "127.0.0.1:1/",
    ] {
        assert!(out.contains(needle), "names {needle:?}: {out}");
    }
    assert!(out.contains("FAILED: cannot reach PostgreSQL"), "{out}");

    // librdkafka settings pass through, and a wrong one is named.
    let bad_setting = good_config(&db, &s.pg_user).replace(
        "[sources.x]",
        "[kafka.producer]\n\"no.such.setting\" = \"1\"\n[sources.x]",
    );
    let (code, out) = check(&bad_setting, true);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no.such.setting"), "names the setting: {out}");
    cleanup(&db).await;
    admin()
        .await
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("drop role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_are_retried_with_backoff_and_named() {
    let s = stack();
    let (db, _) = db_with("unreach", "CREATE TABLE t (id int PRIMARY KEY)").await;

    for (what, kafka_extra, replace_from, replace_to, component) in [
        (
            "kafka",
            "request_timeout = \"1s\"",
            s.bootstrap.clone(),
            "127.0.0.1:1".to_string(),
            "component=\"kafka\"",
        ),
        (
            "registry",
            "request_timeout = \"1s\"",
            s.registry_url.clone(),
            "http://127.0.0.1:1/apis/ccompat/v7".to_string(),
            "component=\"schema_registry\"",
        ),
        (
            "postgres",
            "",
            format!("port = {}", s.pg_port),
            "port = 1".to_string(),
            "component=\"postgres\"",
        ),
    ] {
        let spec = SourceSpec::new(&db);
        let (cfg, _dir) = write_config(&spec, kafka_extra);
        let text = std::fs::read_to_string(&cfg)
            .expect("read")
            .replace(&replace_from, &replace_to);
        std::fs::write(&cfg, text).expect("write");
        let mut daemon = Daemon::start(&cfg, what);
        daemon
            .wait_log("retry_in=2s", Duration::from_secs(60))
            .await;
        assert!(
            daemon.is_running(),
            "{what}: the daemon keeps running and retrying"
        );
        let log = daemon.log_text();
        assert!(
            log.contains(component),
            "{what}: the log names the component: {log}"
        );
        assert!(
            log.contains("retry_in=1s") && log.contains("retry_in=2s"),
            "{what}: backoff grows: {log}"
        );
        assert_eq!(
            daemon.terminate(),
            Some(0),
            "{what}: stops cleanly while retrying"
        );
    }
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_process_is_refused_with_the_reason() {
    let (db, _) = db_with("held", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg_a, _dir_a) = write_config(&spec, "");
    let (cfg_b, _dir_b) = write_config(&spec, "");
    let mut a = Daemon::start_streaming(&cfg_a, "a").await;
    let mut b = Daemon::start(&cfg_b, "b");
    b.wait_log("is in use", Duration::from_secs(60)).await;
    assert!(
        b.is_running(),
        "the second daemon retries instead of crashing"
    );
    assert!(a.is_running());
    assert_eq!(b.terminate(), Some(0));
    assert_eq!(a.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_service_was_unreachable_arrive_once_it_is_back() {
    let s = stack();
    let (db, client) = db_with("outage", "CREATE TABLE t (id bigint PRIMARY KEY, v text)").await;
    let registry_port: u16 = s
        .registry_url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("registry URL on 127.0.0.1");
    let pg_gate = Gate::start(s.pg_port, true).await;
    let registry_gate = Gate::start(registry_port, false).await;

    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "request_timeout = \"2s\"");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace(
            &format!("port = {}", s.pg_port),
            &format!("port = {}", pg_gate.port),
        )
        .replace(
            &format!("127.0.0.1:{registry_port}/"),
            &format!("127.0.0.1:{}/", registry_gate.port),
        );
    std::fs::write(&cfg, text).expect("write");

    // The registry is down at start: the daemon waits and retries; rows are written meanwhile.
    let mut daemon = Daemon::start(&cfg, "daemon");
    daemon
        .wait_log("component=\"schema_registry\"", Duration::from_secs(60))
        .await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'before registry' FROM generate_series(1, 100) g")
        .await
        .expect("insert");
    registry_gate.set_open(true);
    daemon
        .wait_log("streaming started", Duration::from_secs(60))
        .await;

    // PostgreSQL drops away mid-stream; rows are written (directly) while the daemon retries.
    client
        .batch_execute("INSERT INTO t SELECT g, 'streamed' FROM generate_series(101, 200) g")
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg_gate.set_open(false);
    daemon
        .wait_log("component=\"postgres\"", Duration::from_secs(60))
        .await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'during outage' FROM generate_series(201, 300) g")
        .await
        .expect("insert");
    pg_gate.set_open(true);

    let records = consume(
        &spec.topic("t"),
        300,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let ids: std::collections::BTreeSet<i64> =
        records.iter().filter_map(|r| r.key_long("id")).collect();
    assert_eq!(
        ids.len(),
        300,
        "every row written around the outages is on Kafka"
    );
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&300));
    assert!(daemon.is_running());
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_output_and_clear_ones_are_flagged() {
    use std::os::unix::fs::PermissionsExt;
    let (db, _) = db_with("secret", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let secret = "BC9-TOPSECRET-7c1e9";

    // A wrong password from the environment: authentication fails and is logged, the secret is not.
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let mut daemon = Daemon::start_with(&cfg, "daemon", &[("TEST_PG_PASSWORD", secret)]);
    daemon
        .wait_log("retry_in=2s", Duration::from_secs(60))
        .await;
    assert_eq!(daemon.terminate(), Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains("component=\"postgres\""),
        "the failure is logged: {log}"
    );
    assert!(
        !log.contains(secret),
        "the secret leaked into the log:\n{log}"
    );

    let text = std::fs::read_to_string(&cfg).expect("read");
    let (code, printed) = cli(
        &cfg,
        &["check", "--connect"],
        &[("TEST_PG_PASSWORD", secret)],
    );
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        !printed.contains(secret),
        "the secret leaked into check's output:\n{printed}"
    );

    // A secret written in clear in a file every user can read is flagged; a private file is not.
    let clear = text.replace("${TEST_PG_PASSWORD}", secret);
    std::fs::write(&cfg, &clear).expect("write");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (_, printed) = cli(&cfg, &["check"], &[]);
    assert!(
        printed.contains("readable by every user")
            && printed.contains(&format!("sources.{db}.password")),
        "{printed}"
    );
    assert!(
        !printed.contains(secret),
        "the warning names the key, not the value: {printed}"
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(!cli(&cfg, &["check"], &[])
        .1
        .contains("readable by every user"));
    cleanup(&db).await;
}

/// Every file of tests/broken_configs is refused by `check` (without `--connect`) with exit
/// code 2 and a message naming the file and containing each of its `# expect:` lines. Its
/// `# why:` line says what is broken. All problems are collected and reported together.
#[test]
fn every_broken_config_in_the_corpus_exits_2_naming_file_key_and_fix() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken_configs");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&corpus)
        .expect("tests/broken_configs exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "{} holds {} broken configs, expected at least 30",
        corpus.display(),
        files.len()
    );
    // Copies in a fresh directory: the message then names a path of a known form.
    let dir = std::env::temp_dir().join(unique("bc9broken"));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name")
            .to_string();
        let text = std::fs::read_to_string(file).expect("read broken config");
        let needles: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let mut problems = Vec::new();
        if needles.is_empty() {
            problems.push("has no `# expect:` line".to_string());
        }
        if !text.lines().any(|l| l.starts_with("# why:")) {
            problems.push("has no `# why:` line".to_string());
        }
        let copy = dir.join(&name);
        std::fs::write(&copy, &text).expect("copy broken config");
        let (code, out) = cli(&copy, &["check"], &[]);
        if code != Some(2) {
            problems.push(format!("exit code {code:?}, expected 2"));
        }
        if !out.contains(&name) {
            problems.push("the output does not name the file".to_string());
        }
        for n in needles {
            if !out.contains(n) {
                problems.push(format!("the output lacks {n:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name}: {}\n    output: {}",
                problems.join("; "),
                out.trim_end().replace('\n', "\n            ")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} of {} broken configs were not refused as expected:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
