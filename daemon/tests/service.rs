//! Running as a service: systemd notifications over a real unix datagram socket, and the admin
//! endpoint (metrics, health, readiness, status, token).

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Collects every datagram sent to a fresh NOTIFY_SOCKET.
fn notify_socket() -> (String, Arc<Mutex<Vec<String>>>) {
    let path = std::env::temp_dir().join(format!("{}.sock", unique("bc9notify")));
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let messages = Arc::new(Mutex::new(Vec::new()));
    let sink = messages.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let mut m = sink.lock().unwrap_or_else(|p| p.into_inner());
                    m.extend(text.lines().map(str::to_string));
                    if text.contains("STOPPING=1") {
                        return;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    });
    (path.display().to_string(), messages)
}

fn lines(m: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    m.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_ready_status_watchdog_stopping_in_order() {
    let (db, _) = db_with("notify", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let (mut daemon, messages) = start_under_watchdog(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lines(&messages).iter().any(|l| l == "READY=1") {
        assert!(
            std::time::Instant::now() < deadline,
            "no READY=1; got {:?}\n{}",
            lines(&messages),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        daemon.log_text().contains("created replication slot"),
        "READY only once the connector started"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(daemon.terminate(), Some(0));
    let m = lines(&messages);
    let pos = |needle: &str| m.iter().position(|l| l.starts_with(needle));
    let ready = pos("READY=1").expect("READY=1");
    let stopping = pos("STOPPING=1").expect("STOPPING=1");
    let streaming_status = m
        .iter()
        .position(|l| l.starts_with("STATUS=") && l.contains("streaming at"))
        .expect("a STATUS line saying where it streams");
    assert!(
        pos("STATUS=").expect("STATUS") < ready,
        "status reported while starting: {m:?}"
    );
    assert!(ready < stopping && streaming_status < stopping, "{m:?}");
    let pings = m.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(pings >= 3, "watchdog pinged while healthy ({pings}): {m:?}");
    cleanup(&db).await;
}

/// Starts the daemon as systemd would with `WatchdogSec=1.5s`, listening on a real notify socket.
fn start_under_watchdog(
    cfg: &std::path::Path,
) -> (Daemon, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let (socket, messages) = notify_socket();
    let daemon = Daemon::start_with(
        cfg,
        "daemon",
        &[
            ("NOTIFY_SOCKET", &socket),
            ("WATCHDOG_USEC", "1500000"),
            ("WATCHDOG_PID", "self"),
        ],
    );
    (daemon, messages)
}

fn counter(
    metrics: &std::collections::HashMap<String, f64>,
    name: &str,
    connector: &str,
    op: &str,
) -> f64 {
    metrics
        .iter()
        .find(|(k, _)| {
            k.starts_with(name)
                && k.contains(&format!("connector=\"{connector}\""))
                && k.contains(&format!("op=\"{op}\""))
        })
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_metrics_health_readiness_status_and_token() {
    let s = stack();
    let (db, client) = db_with("admin", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let pg_gate = Gate::start(s.pg_port, true).await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace(
            &format!("port = {}", s.pg_port),
            &format!("port = {}", pg_gate.port),
        )
        .replace("[admin]", "[admin]\ntoken = \"s3cret-token\"");
    std::fs::write(&cfg, text).expect("write");
    let mut daemon = Daemon::start(&cfg, "daemon");
    let addr = admin_addr(&mut daemon).await;
    daemon
        .wait_log("streaming started", Duration::from_secs(60))
        .await;

    assert_eq!(
        http_get(&addr, "/healthz", None).await.0,
        200,
        "liveness needs no token"
    );
    assert_eq!(
        http_get(&addr, "/status", None).await.0,
        401,
        "status needs the token"
    );
    assert_eq!(http_get(&addr, "/metrics", Some("wrong")).await.0, 401);
    let token = Some("s3cret-token");
    let (code, body) = http_get(&addr, "/readyz", token).await;
    assert_eq!(code, 200, "{body}");

    let before = parse_prometheus(&http_get(&addr, "/metrics", token).await.1);
    client
        .batch_execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await
        .expect("insert");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = parse_prometheus(&http_get(&addr, "/metrics", token).await.1);
        let delta = counter(&now, "bitclone9_source_events_total", &db, "c")
            - counter(&before, "bitclone9_source_events_total", &db, "c");
        if delta >= 50.0 {
            assert_eq!(
                delta, 50.0,
                "the insert counter moved by exactly the rows inserted"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics did not move: {delta}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The checkpoint is written when the stream pauses (at most every 200 ms): wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let m = parse_prometheus(&http_get(&addr, "/metrics", token).await.1);
        let written = m.iter().any(|(k, v)| {
            k.starts_with("bitclone9_checkpoint_timestamp_seconds")
                && k.contains(&format!("connector=\"{db}\""))
                && *v > 1.6e9
        });
        if written || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gauge = |name: &str| {
        metrics
            .iter()
            .find(|(k, _)| k.starts_with(name) && k.contains(&format!("connector=\"{db}\"")))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} for {db} is exported"))
    };
    assert_eq!(gauge("bitclone9_connector_up"), 1.0);
    assert!(gauge("bitclone9_checkpoint_timestamp_seconds") > 1.6e9);
    assert!(gauge("bitclone9_source_retained_wal_bytes") >= 0.0);
    assert!(gauge("bitclone9_source_slot_lag_bytes") >= 0.0);
    let (code, body) = http_get(&addr, "/status", token).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(status["connectors"][&db]["state"], "streaming", "{body}");
    assert!(
        status["connectors"][&db]["confirmed_lsn"].is_string(),
        "{body}"
    );
    assert!(
        status["version"].as_str().is_some_and(|v| v.contains('(')),
        "version with commit: {body}"
    );

    // PostgreSQL goes away: not ready, and /status says why.
    pg_gate.set_open(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(&addr, "/readyz", token).await;
        if code == 503 {
            assert!(
                body.contains("retrying") && body.contains("postgres"),
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still ready without PostgreSQL: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    pg_gate.set_open(true);
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[test]
fn version_names_the_release_and_the_commit() {
    let out = std::process::Command::new(bin())
        .arg("--version")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!("bitclone9 {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_restarts_only_changed_connectors() {
    let db_a = unique("reload");
    let db_b = unique("reload");
    for db in [&db_a, &db_b] {
        fresh_db(db)
            .await
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
            .await
            .expect("table");
    }
    let spec_a = SourceSpec::new(&db_a);
    let (cfg, _dir) = write_config(&spec_a, "");
    let mut daemon = Daemon::start(&cfg, "daemon");
    daemon
        .wait_log(
            &format!("streaming started source={db_a}"),
            Duration::from_secs(60),
        )
        .await;

    // Add a second source: it starts; the first keeps running untouched.
    let original = std::fs::read_to_string(&cfg).expect("read");
    let second = original
        .split("[sources.")
        .nth(1)
        .expect("source section")
        .replace(&db_a, &db_b);
    std::fs::write(&cfg, format!("{original}\n[sources.{second}")).expect("write");
    let hup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP")
    };
    hup(daemon.child.id());
    daemon
        .wait_log(
            &format!("streaming started source={db_b}"),
            Duration::from_secs(60),
        )
        .await;
    let starts_a = |log: &str| {
        log.matches(&format!("starting pipeline connector={db_a}"))
            .count()
    };
    assert_eq!(
        starts_a(&daemon.log_text()),
        1,
        "the unchanged source was not restarted"
    );

    // A broken file is refused and everything keeps running.
    std::fs::write(&cfg, "this is [not toml").expect("write");
    hup(daemon.child.id());
    daemon
        .wait_log("reload refused", Duration::from_secs(30))
        .await;
    assert!(daemon.is_running());
    assert_eq!(starts_a(&daemon.log_text()), 1);
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db_a).await;
    cleanup(&db_b).await;
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let dir = std::env::temp_dir().join(unique("bc9unit"));
    std::fs::create_dir_all(&dir).expect("dir");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/bitclone9.service"
    ))
    .expect("unit file")
    .replace("/usr/local/bin/bitclone9", &bin().display().to_string());
    let path = dir.join("bitclone9.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    for needle in [
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=",
        "ExecReload=",
        "StateDirectory=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            std::fs::read_to_string(&path)
                .expect("read")
                .contains(needle),
            "unit has {needle}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_connector_on_every_pipeline_line() {
    let db = unique("jsonlog");
    fresh_db(&db)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .expect("table");
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("[daemon]", "[daemon]\nlog_format = \"json\"");
    std::fs::write(&cfg, text).expect("write");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    assert_eq!(daemon.terminate(), Some(0));
    let mut pipeline_lines = 0;
    for line in daemon.log_text().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        if v["target"].as_str().is_some_and(|t| {
            t.starts_with("bitclone9_postgres_source") || t == "bitclone9::pipeline"
        }) {
            pipeline_lines += 1;
            let named = v["span"]["connector"] == db.as_str()
                || v["fields"]["connector"] == db.as_str()
                || v["fields"]["source"] == db.as_str();
            assert!(named, "a connector's line names it: {line}");
        }
    }
    assert!(
        pipeline_lines >= 3,
        "pipeline lines were checked ({pipeline_lines})"
    );
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_slot_commands_with_the_daemon_up_and_down() {
    let db = unique("cli");
    fresh_db(&db)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .expect("table");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let text = std::fs::read_to_string(&cfg).expect("read").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&cfg, text).expect("write");
    let slot = format!("bitclone9_{db}");

    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    let (code, out) = cli(&cfg, &["status"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("daemon running") && out.contains(&format!("{db}: streaming")),
        "{out}"
    );
    let (code, out) = cli(&cfg, &["slot", "show"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&slot) && out.contains(" active"), "{out}");
    let (code, out) = cli(&cfg, &["slot", "drop", "--source", &db], &[]);
    assert_eq!(code, Some(2), "needs --yes: {out}");
    let (code, out) = cli(&cfg, &["slot", "drop", "--source", &db, "--yes"], &[]);
    assert_eq!(code, Some(1), "refused while the daemon runs: {out}");
    assert!(out.contains("stop bitclone9"), "{out}");
    // A consistent copy of the checkpoint store while the daemon runs (once it holds the
    // snapshot's record); restoring waits for a stop.
    daemon
        .wait_log("snapshot delivered and recorded", Duration::from_secs(30))
        .await;
    let backup = cfg.with_file_name("checkpoint-backup");
    let backup_arg = backup.display().to_string();
    let (code, out) = cli(&cfg, &["checkpoint", "backup", "--to", &backup_arg], &[]);
    assert_eq!(code, Some(0), "backup while running: {out}");
    let (code, out) = cli(
        &cfg,
        &["checkpoint", "restore", "--from", &backup_arg, "--yes"],
        &[],
    );
    assert_eq!(
        code,
        Some(1),
        "restore refused while the daemon runs: {out}"
    );
    assert!(out.contains("stop bitclone9"), "{out}");
    assert_eq!(daemon.terminate(), Some(0));
    let (code, out) = cli(
        &cfg,
        &["checkpoint", "restore", "--from", &backup_arg, "--yes"],
        &[],
    );
    assert_eq!(code, Some(0), "restore once stopped: {out}");

    let (code, out) = cli(&cfg, &["status"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("daemon not running")
            && out.contains("snapshot done")
            && !out.contains("checkpoint none"),
        "{out}"
    );
    let (code, out) = cli(&cfg, &["slot", "show"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("inactive"), "{out}");
    let (code, out) = cli(&cfg, &["slot", "drop", "--source", &db, "--yes"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("dropped"), "{out}");
    assert!(
        confirmed_flush(&admin().await, &slot).await.is_none(),
        "the slot is gone"
    );
    let (_, out) = cli(&cfg, &["status"], &[]);
    assert!(
        out.contains("checkpoint none") && out.contains("not done"),
        "checkpoint cleared: {out}"
    );
    cleanup(&db).await;
}

/// Every metric the code exports is documented, and the shipped dashboard and alert rules only
/// use metrics that exist.
#[test]
fn metrics_docs_dashboard_and_alerts_agree_with_the_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let names = |text: &str| -> std::collections::BTreeSet<String> {
        text.match_indices("bitclone9_")
            .map(|(i, _)| {
                text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect::<String>()
            })
            .filter(|n| {
                n.ends_with("_total")
                    || n.ends_with("_bytes")
                    || n.ends_with("_seconds")
                    || n.ends_with("_lsn")
                    || n.ends_with("_up")
            })
            .collect()
    };
    // Every source file of the daemon and the connectors, in every folder below them.
    let mut code = String::new();
    let mut dirs: Vec<std::path::PathBuf> = [
        "daemon/src",
        "connectors/core/src",
        "connectors/kafka/src",
        "connectors/postgres-source/src",
        "connectors/postgres-sink/src",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                code.push_str(
                    &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}")),
                );
            }
        }
    }
    let exported = names(&code);
    assert!(
        exported.len() >= 8,
        "found the exported metrics: {exported:?}"
    );
    let documented = names(&read("docs/metrics.md"));
    assert_eq!(
        exported, documented,
        "docs/metrics.md lists exactly the exported metrics"
    );
    for file in [
        "config/grafana-dashboard.json",
        "config/prometheus-alerts.yml",
    ] {
        for used in names(&read(file)) {
            assert!(
                exported.contains(&used),
                "{file} uses {used}, which is not exported"
            );
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("config/grafana-dashboard.json")).expect("dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_need_the_token_and_are_audited() {
    let (db, client) = db_with("admin", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let with_token = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("[admin]", "[admin]\ntoken = \"s3cret-token\"");
    std::fs::write(&cfg, &with_token).expect("write");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    let addr = admin_addr(&mut daemon).await;
    let token = Some("s3cret-token");
    let pause = format!("/connectors/{db}/pause");
    let (code, _) = http_request(&addr, "POST", &pause, None).await;
    assert_eq!(code, 401, "pausing needs the token");
    let (code, body) = http_request(&addr, "POST", "/connectors/nope/pause", token).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_request(&addr, "POST", &pause, token).await;
    assert_eq!(code, 200, "{body}");
    let (_, status) = http_get(&addr, "/status", token).await;
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(v["connectors"][&db]["state"], "paused", "{status}");
    let (code, body) = http_get(&addr, "/readyz", token).await;
    assert_eq!(code, 200, "a paused connector is not a failing one: {body}");

    // While paused nothing is read; after resuming the change arrives.
    client
        .batch_execute("INSERT INTO t VALUES (7)")
        .await
        .expect("insert");
    let records = consume(
        &spec.topic("t"),
        2,
        Duration::from_secs(3),
        Duration::from_secs(4),
    )
    .await;
    assert!(
        records.iter().all(|r| r.op().as_deref() != Some("c")),
        "paused, yet the insert arrived: {records:?}"
    );
    let (code, body) =
        http_request(&addr, "POST", &format!("/connectors/{db}/resume"), token).await;
    assert_eq!(code, 200, "{body}");
    let records = consume(
        &spec.topic("t"),
        2,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        records.iter().any(|r| r.op().as_deref() == Some("c")),
        "resumed, the insert arrives: {records:?}"
    );
    let log = daemon.log_text();
    let audits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bitclone9::audit") && l.contains("admin action"))
        .collect();
    assert!(
        audits
            .iter()
            .any(|l| l.contains("action=\"pause\"") && l.contains("result=paused")),
        "{audits:?}"
    );
    assert!(
        audits
            .iter()
            .any(|l| l.contains("action=\"resume\"") && l.contains("result=resumed")),
        "{audits:?}"
    );
    assert_eq!(daemon.terminate(), Some(0));

    // Without a configured token, mutating endpoints are refused outright.
    std::fs::write(&cfg, with_token.replace("token = \"s3cret-token\"\n", "")).expect("write");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon2").await;
    let addr = admin_addr(&mut daemon).await;
    let (code, body) = http_request(&addr, "POST", &pause, None).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin.token"), "{body}");
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_connector_stops_the_watchdog_pings() {
    let (db, _) = db_with("notify", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let (mut daemon, messages) = start_under_watchdog(&cfg);
    daemon
        .wait_log("streaming started", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Freeze the server process that streams this slot's WAL: the connector waits on it forever.
    let pid = walsender_pid(&format!("bitclone9_{db}")).await;
    let frozen = Frozen::new(pid);
    let before = lines(&messages)
        .iter()
        .filter(|l| *l == "WATCHDOG=1")
        .count();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let frozen_log = daemon.log_text();
    let during = lines(&messages)
        .iter()
        .filter(|l| *l == "WATCHDOG=1")
        .count();
    drop(frozen);
    assert!(
        frozen_log.contains("made no progress within the watchdog interval"),
        "{frozen_log}"
    );
    // About 1.5 s of pings at most before the hang is noticed, then none.
    assert!(
        during - before <= 4,
        "pinged {} times while stuck",
        during - before
    );
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_loses_nothing() {
    let (db, client) = db_with("term", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    // Positions reach the server rarely, so that what Kafka acknowledged is still unconfirmed
    // when the server freezes: the clean stop then has a final position to wait for.
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("status_interval = \"200ms\"", "status_interval = \"30s\"");
    std::fs::write(&cfg, text).expect("write");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    client
        .batch_execute("INSERT INTO t SELECT generate_series(1, 50)")
        .await
        .expect("rows");
    let topic = spec.topic("t");
    let ids = |records: &[Record]| {
        let mut ids: Vec<i64> = records
            .iter()
            .filter(|r| r.op().as_deref() == Some("c"))
            .filter_map(|r| r.key_long("id"))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    assert_eq!(
        ids(&consume(&topic, 51, Duration::from_secs(2), Duration::from_secs(60)).await).len(),
        50
    );
    // Once Kafka holds rows 51 to 100, freeze the walsender: the clean stop cannot confirm its
    // final position and waits.
    let pid = walsender_pid(&format!("bitclone9_{db}")).await;
    client
        .batch_execute("INSERT INTO t SELECT generate_series(51, 100)")
        .await
        .expect("rows");
    assert_eq!(
        ids(&consume(&topic, 101, Duration::from_secs(2), Duration::from_secs(60)).await).len(),
        100
    );
    let frozen = Frozen::new(pid);
    let daemon_pid = daemon.child.id();
    send_signal("-TERM", daemon_pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        daemon.is_running(),
        "the clean stop waits for the frozen server"
    );
    let second = std::time::Instant::now();
    send_signal("-TERM", daemon_pid);
    let mut code = None;
    while second.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(st)) = daemon.child.try_wait() {
            code = st.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(frozen);
    assert_eq!(
        code,
        Some(130),
        "the second signal exits at once:\n{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("second signal, exiting now"));
    // The next start resumes from the last checkpoint: every row arrives.
    let mut daemon = Daemon::start_streaming(&cfg, "daemon2").await;
    let records = consume(&topic, 101, Duration::from_secs(3), Duration::from_secs(60)).await;
    assert_eq!(ids(&records), (1..=100).collect::<Vec<i64>>());
    assert_eq!(daemon.terminate(), Some(0));
    cleanup(&db).await;
}
