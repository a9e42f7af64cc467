//! PostgreSQL over TLS with SCRAM authentication: verify-full against a CA the test makes, and a
//! wrong CA refused with a message that says what to check.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn sh(dir: &std::path::Path, script: &str) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Inserts a row into `t` of a freshly started source; its topic must then hold the snapshot's
/// opening truncate and that insert, in that order.
async fn insert_one_and_expect_it(client: &tokio_postgres::Client, spec: &SourceSpec) {
    client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");
    let records = consume(
        &spec.topic("t"),
        2,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let ops: Vec<Option<String>> = records.iter().map(|r| r.op()).collect();
    assert_eq!(
        ops,
        [Some("t".to_string()), Some("c".to_string())],
        "the snapshot's opening truncate, then the streamed insert"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_verify_full_works_and_a_wrong_ca_is_refused() {
    let dir = std::env::temp_dir().join(unique("bc9tls"));
    std::fs::create_dir_all(&dir).expect("dir");
    sh(
        &dir,
        r#"chmod 755 .
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=BitClone9 test CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout wrong.key -out wrong.pem -days 2 -subj "/CN=Some other CA" 2>/dev/null
chmod 600 server.key
if [ "$(id -u)" = 0 ]; then chown postgres server.key server.pem; fi"#,
    );
    let admin = admin().await;
    for sql in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}/server.pem'",
            dir.display()
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}/server.key'",
            dir.display()
        ),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        admin.batch_execute(&sql).await.expect("turn TLS on");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (db, client) = db_with("tls", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut spec = SourceSpec::new(&db);
    spec.extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}/ca.pem\"",
        dir.display()
    );
    let (cfg, _dir) = write_config(&spec, "");
    // verify-full checks that the certificate names the host: connect by name.
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    std::fs::write(&cfg, text).expect("write");
    let mut daemon = Daemon::start_streaming(&cfg, "daemon").await;
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1 AND s.ssl",
            &[&db],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(
        encrypted >= 2,
        "catalog and replication connections both use TLS ({encrypted})"
    );
    insert_one_and_expect_it(&client, &spec).await;
    assert_eq!(daemon.terminate(), Some(0));

    // The same server checked against another CA: refused, saying what to look at.
    let wrong = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("ca.pem", "wrong.pem");
    std::fs::write(&cfg, wrong).expect("write");
    let (code, printed) = cli(&cfg, &["check", "--connect"], &[]);
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains("TLS with PostgreSQL") && printed.contains("sslrootcert"),
        "{printed}"
    );

    for sql in [
        "ALTER SYSTEM RESET ssl",
        "ALTER SYSTEM RESET ssl_cert_file",
        "ALTER SYSTEM RESET ssl_key_file",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("turn TLS off");
    }
    cleanup(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_client_certificates_works_and_refuses_a_client_without_one() {
    let (db, client) = db_with("tlsclient", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let spec = SourceSpec::new(&db);
    let (cfg, _dir) = write_config(&spec, "");
    let stack_dir = format!(
        "{}/.stack/tls",
        env!("CARGO_MANIFEST_DIR").trim_end_matches("/daemon")
    );
    let ca = env_or("BC9_TLS_CA", &format!("{stack_dir}/ca.pem"));
    let cert = env_or("BC9_TLS_CLIENT_CERT", &format!("{stack_dir}/client.crt"));
    let key = env_or("BC9_TLS_CLIENT_KEY", &format!("{stack_dir}/client.key"));
    let mtls = env_or("BC9_KAFKA_MTLS_BOOTSTRAP", "127.0.0.1:9095");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace(
            &format!("bootstrap_servers = \"{}\"", stack().bootstrap),
            &format!("bootstrap_servers = \"{mtls}\""),
        )
        .replace(
            "[sources.",
            &format!(
                "request_timeout = \"4s\"\n[kafka.tls]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n[sources."
            ),
        );
    std::fs::write(&cfg, &text).expect("write");
    let (code, out) = cli(&cfg, &["check", "--connect"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("kafka {mtls}: ok")), "{out}");

    // The source writes through the listener that requires a client certificate.
    let mut daemon = Daemon::start_streaming(&cfg, "mtls").await;
    insert_one_and_expect_it(&client, &spec).await;
    assert_eq!(daemon.terminate(), Some(0));

    // Without the certificate the broker refuses the handshake, and the error says so.
    let without = cfg.with_file_name("without-cert.toml");
    std::fs::write(
        &without,
        text.replace(
            &format!("cert_file = \"{cert}\"\nkey_file = \"{key}\"\n"),
            "",
        ),
    )
    .expect("write");
    let (code, out) = cli(&without, &["check", "--connect"], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("kafka {mtls}: FAILED")) && out.contains("the brokers said"),
        "{out}"
    );
    cleanup(&db).await;
}
