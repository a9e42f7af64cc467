//! The run's operator: a person who reads the daemon's log and does what its messages ask,
//! as the messages say it.
//!
//! ```text
//!  run*.log (new lines) ──► "… compatibility rule of subject S (…)"  ──► PUT {"compatibility":"NONE"}
//!                      │                                                   to the registry's config/S
//!                      └──► "… column code from text to bigint, and the  ──► ALTER TABLE doc … USING
//!                            target cannot cast its values …"                 (the source's expression)
//! ```
//!
//! It acts on the services directly (not through the gates the faults close), retries while
//! a service does not answer, and does each thing once. What it did is returned for the report.

use crate::common::stack;
use crate::connect_retrying;
use crate::workload::RETYPE_CODE;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

/// What the source says when the registry refuses a new schema; the subject follows.
const REFUSED: &str = "compatibility rule of subject ";
/// What the sink says when the target cannot cast `doc.code` to the source's new type.
const UNCASTABLE: &str =
    "changed column code from text to bigint, and the target cannot cast its values";

/// Watches the logs of every run of the daemon in `dir` until `stop`.
pub(crate) fn start_operator(
    dir: PathBuf,
    target_db: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut done: Vec<String> = Vec::new();
        let mut read_to: HashMap<PathBuf, u64> = HashMap::new();
        let mut subjects: BTreeSet<String> = BTreeSet::new();
        let mut allowed: BTreeSet<String> = BTreeSet::new();
        let mut cast_asked = false;
        let mut cast_done = false;
        while !*stop.borrow() {
            for line in new_lines(&dir, &mut read_to) {
                if let Some(rest) = line.split(REFUSED).nth(1) {
                    if let Some(subject) = rest.split(" (").next() {
                        subjects.insert(subject.to_string());
                    }
                }
                cast_asked |= line.contains(UNCASTABLE);
            }
            for subject in subjects.difference(&allowed.clone()) {
                if allow_any_change(subject).await {
                    println!("chaos: operator: the registry refused a schema of {subject}: set its compatibility to NONE");
                    done.push(format!("compatibility NONE for {subject}"));
                    allowed.insert(subject.clone());
                }
            }
            if cast_asked && !cast_done {
                match retype_target(&target_db).await {
                    Ok(true) => {
                        println!("chaos: operator: the sink cannot cast doc.code: ran the source's expression in the target");
                        done.push("doc.code converted in the target".to_string());
                        cast_done = true;
                    }
                    Ok(false) => cast_done = true,
                    Err(e) => {
                        println!("chaos: operator: converting doc.code failed, again soon: {e}")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        done
    })
}

/// The complete lines written to the `run*.log` files of `dir` since the last call.
fn new_lines(dir: &PathBuf, read_to: &mut HashMap<PathBuf, u64>) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return lines;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("run") && name.ends_with(".log")) {
            continue;
        }
        let from = read_to.get(&path).copied().unwrap_or(0);
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
            continue;
        }
        // Only whole lines: a line being written is read next time.
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        read_to.insert(path, from + end as u64 + 1);
        lines.extend(
            String::from_utf8_lossy(&buf[..end])
                .lines()
                .map(str::to_string),
        );
    }
    lines
}

/// `PUT {"compatibility": "NONE"}` to the registry's `config/<subject>`, as the source's message
/// says; false when the registry does not answer (it may be frozen by a fault).
async fn allow_any_change(subject: &str) -> bool {
    let url = format!(
        "{}/config/{subject}",
        stack().registry_url.trim_end_matches('/')
    );
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "-X", "PUT", &url])
        .args(["-H", "Content-Type: application/vnd.schemaregistry.v1+json"])
        .args(["-d", r#"{"compatibility":"NONE"}"#])
        .output()
        .await;
    matches!(out, Ok(o) if o.status.success())
}

/// Runs the source's expression on the target's `doc.code` while it is still text: true when
/// it ran, false when the column already had the new type.
async fn retype_target(target_db: &str) -> Result<bool, tokio_postgres::Error> {
    let c = connect_retrying(target_db).await;
    let ty: Option<String> = c
        .query_opt(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'public.doc'::regclass AND attname = 'code' AND NOT attisdropped",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    if ty.as_deref() != Some("text") {
        return Ok(false);
    }
    c.batch_execute(&format!("SET lock_timeout = '5s'; {RETYPE_CODE}"))
        .await?;
    Ok(true)
}
