//! What each connector is doing, shared by the pipelines (writers), the admin endpoint, and
//! systemd notifications (readers). Updated once per batch, never per event.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorState {
    Starting,
    Snapshotting,
    Streaming,
    /// Failed; waiting out the backoff before the next attempt.
    Retrying,
    /// Stopped by an operator (`POST /connectors/NAME/pause`) until resumed.
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectorStatus {
    pub state: ConnectorState,
    pub slot: String,
    /// The last position Kafka acknowledged and the slot was told.
    pub confirmed_lsn: Option<String>,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// After a failure: the seconds the supervisor waits (or waited) before the next attempt;
    /// cleared once the connector is up again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_wait_s: Option<f64>,
    /// What the current state is working on, e.g. the table being snapshotted.
    pub detail: Option<String>,
    /// Seconds since the pipeline last made a step (read a batch, or waited out a backoff).
    pub idle_s: f64,
    /// For a sink: each partition's applied offset, end and lag (refreshed every 10 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkProgress>,
    /// For a source: tables include/exclude match that are not captured, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out_tables: Vec<String>,
    /// For a sink: tables stopped by a change the target cannot follow by itself, with why
    /// and when they are tried again (the sink's other tables go on).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped_tables: Vec<String>,
    /// Events an operator should know of that did not stop the connector (e.g. a table dropped
    /// at the source), newest last; the last 20 are kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(skip)]
    alive_at: Instant,
    /// Times the connector came up (reached snapshotting or streaming): its supervisor tells by
    /// it whether a failed run had connected to everything first.
    #[serde(skip)]
    ups: u64,
}

/// Where a sink stands in its topics.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SinkProgress {
    /// Records in the sink's partitions that the target does not hold yet.
    pub lag_records: i64,
    pub partitions: Vec<PartitionProgress>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// Last offset applied to the target (none yet: nothing applied).
    pub applied_offset: Option<i64>,
    /// The partition's end (next offset to be written).
    pub end_offset: i64,
    pub lag_records: i64,
}

/// Every connector's status.
#[derive(Default)]
pub struct Status {
    connectors: Mutex<BTreeMap<String, ConnectorStatus>>,
}

impl Status {
    pub fn register(&self, name: &str, slot: &str) {
        self.update(name, |c| c.slot = slot.to_string());
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ConnectorStatus)) {
        let mut map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        let c = map
            .entry(name.to_string())
            .or_insert_with(|| ConnectorStatus {
                state: ConnectorState::Starting,
                slot: String::new(),
                confirmed_lsn: None,
                restarts: 0,
                last_error: None,
                retry_wait_s: None,
                detail: None,
                idle_s: 0.0,
                sink: None,
                left_out_tables: Vec::new(),
                stopped_tables: Vec::new(),
                notes: Vec::new(),
                alive_at: Instant::now(),
                ups: 0,
            });
        c.alive_at = Instant::now();
        f(c);
        let up = matches!(
            c.state,
            ConnectorState::Snapshotting | ConnectorState::Streaming
        );
        metrics::gauge!("bitclone9_connector_up", "connector" => name.to_string()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    /// Forgets a connector removed from the configuration.
    pub fn remove(&self, name: &str) {
        let mut map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(name);
    }

    /// Says what the connector is working on (cleared when its state changes).
    pub fn set_detail(&self, name: &str, detail: String) {
        self.update(name, |c| c.detail = Some(detail));
    }

    pub fn set_state(&self, name: &str, state: ConnectorState) {
        self.update(name, |c| {
            if c.state != state {
                c.detail = None;
            }
            if state == ConnectorState::Streaming {
                c.last_error = None;
            }
            let up = |s| matches!(s, ConnectorState::Snapshotting | ConnectorState::Streaming);
            if up(state) && !up(c.state) {
                c.ups += 1;
                c.retry_wait_s = None;
            }
            c.state = state;
        });
    }

    /// How many times the connector has come up so far.
    pub fn ups(&self, name: &str) -> u64 {
        let map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).map_or(0, |c| c.ups)
    }

    pub fn failed(&self, name: &str, error: String, retry_in: Duration) {
        self.update(name, |c| {
            c.state = ConnectorState::Retrying;
            c.retry_wait_s = Some(retry_in.as_secs_f64());
            c.restarts += 1;
            c.last_error = Some(error);
        });
    }

    /// The pipeline made a step.
    pub fn touch(&self, name: &str) {
        self.update(name, |_| {});
    }

    /// Records a note for the operator (kept: the last 20).
    pub fn note(&self, name: &str, note: String) {
        self.update(name, |c| {
            c.notes.push(note);
            if c.notes.len() > 20 {
                c.notes.remove(0);
            }
        });
    }

    /// The tables a source leaves out for want of a replica identity.
    pub fn set_left_out(&self, name: &str, tables: &[bitclone9_core::TableId]) {
        self.update(name, |c| {
            c.left_out_tables = tables
                .iter()
                .map(|t| format!("{t}: no primary key or replica identity (add one, or set REPLICA IDENTITY FULL)"))
                .collect();
        });
    }

    /// The tables a sink has stopped, with why.
    pub fn set_stopped_tables(&self, name: &str, tables: Vec<String>) {
        self.update(name, |c| c.stopped_tables = tables);
    }

    pub fn sink_progress(&self, name: &str, progress: SinkProgress) {
        self.update(name, |c| c.sink = Some(progress));
    }

    pub fn confirmed(&self, name: &str, lsn: String) {
        self.update(name, |c| c.confirmed_lsn = Some(lsn));
    }

    /// A copy of every connector's status.
    pub fn snapshot(&self) -> BTreeMap<String, ConnectorStatus> {
        let map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.idle_s = v.alive_at.elapsed().as_secs_f64();
                (k.clone(), v)
            })
            .collect()
    }

    /// Every connector has started (is snapshotting or streaming) and none is failing.
    pub fn ready(&self) -> bool {
        let map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        !map.is_empty()
            && map.values().all(|c| {
                matches!(
                    c.state,
                    ConnectorState::Snapshotting
                        | ConnectorState::Streaming
                        | ConnectorState::Paused
                )
            })
    }

    /// Connectors that should be making steps but have not for `limit`: a hang, not a failure
    /// being retried.
    pub fn stuck(&self, limit: Duration) -> Vec<String> {
        let map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, c)| {
                matches!(
                    c.state,
                    ConnectorState::Starting
                        | ConnectorState::Snapshotting
                        | ConnectorState::Streaming
                ) && c.alive_at.elapsed() > limit
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let map = self.connectors.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(name, c)| match (c.state, &c.confirmed_lsn) {
                (ConnectorState::Streaming, Some(lsn)) => format!("{name}: streaming at {lsn}"),
                (ConnectorState::Retrying, _) => format!(
                    "{name}: retrying after: {}",
                    c.last_error
                        .as_deref()
                        .unwrap_or("error")
                        .chars()
                        .take(120)
                        .collect::<String>()
                ),
                (state, _) => match &c.detail {
                    Some(d) => format!("{name}: {} ({d})", format!("{state:?}").to_lowercase()),
                    None => format!("{name}: {}", format!("{state:?}").to_lowercase()),
                },
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_connector_has_started() {
        let s = Status::default();
        assert!(!s.ready());
        s.register("a", "slot_a");
        s.register("b", "slot_b");
        s.set_state("a", ConnectorState::Streaming);
        assert!(!s.ready(), "b is still starting");
        s.set_state("b", ConnectorState::Snapshotting);
        assert!(s.ready());
        s.set_state("b", ConnectorState::Streaming);
        assert!(s.ready());
        s.failed("b", "kafka down".into(), Duration::from_secs(1));
        assert!(!s.ready());
        assert!(s.summary().contains("b: retrying after: kafka down"));
        assert!(s.stuck(Duration::from_secs(60)).is_empty());
        assert_eq!(
            s.stuck(Duration::ZERO),
            vec!["a".to_string()],
            "a retrying connector is not stuck"
        );
    }
}
