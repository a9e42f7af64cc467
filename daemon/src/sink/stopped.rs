//! Tables a sink has stopped: a column change of the source that the target cannot follow by
//! itself (a type its values do not cast to, say) stops only its table. The table's topic is
//! given up (its partitions unassigned, its records dropped from the batch) until a retry
//! time, 10 s at first and doubling to 5 min; the sink's other tables go on meanwhile.
//!
//! ```text
//!  batch ─► apply ─► SchemaChange{table} ─► stop(topic): unassign, drop its records,
//!                                            apply the rest again
//!  retry time ─► the topic is read again from the target's positions
//!                  ├─ a batch of it applied ─► resumed
//!                  └─ the same error ───────► stopped again, waiting twice as long
//! ```
//!
//! Nothing of a stopped table is applied or skipped: its positions in the target stay where
//! the last committed batch left them, and reading resumes from there.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const FIRST_WAIT: Duration = Duration::from_secs(10);
const LONGEST_WAIT: Duration = Duration::from_secs(300);

struct Stop {
    table: String,
    error: String,
    wait: Duration,
    retry_at: Instant,
}

/// The stopped tables of one sink, by topic.
pub struct StoppedTables {
    topics: BTreeMap<String, Stop>,
    gauge: metrics::Gauge,
}

impl StoppedTables {
    pub fn new(connector: &str) -> Self {
        let gauge =
            metrics::gauge!("bitclone9_sink_tables_stopped", "connector" => connector.to_string());
        gauge.set(0.0);
        Self {
            topics: BTreeMap::new(),
            gauge,
        }
    }

    /// Stops `topic` (of target `table`) for `error`; returns how long until it is tried again.
    pub fn stop(&mut self, topic: &str, table: &str, error: &str) -> Duration {
        let wait = self
            .topics
            .get(topic)
            .map_or(FIRST_WAIT, |s| (s.wait * 2).min(LONGEST_WAIT));
        self.topics.insert(
            topic.to_string(),
            Stop {
                table: table.to_string(),
                error: error.to_string(),
                wait,
                retry_at: Instant::now() + wait,
            },
        );
        self.gauge.set(self.topics.len() as f64);
        wait
    }

    /// True while `topic` is stopped and its retry time has not come: it is not read.
    pub fn blocks(&self, topic: &str) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|s| Instant::now() < s.retry_at)
    }

    /// Takes note of a batch applied with records of `topics`: a stopped table among them, read
    /// again after its retry time, applies again. Returns those tables.
    pub fn applied<'a>(&mut self, topics: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut resumed = Vec::new();
        for topic in topics {
            if let Some(s) = self.topics.remove(topic) {
                resumed.push(s.table);
            }
        }
        if !resumed.is_empty() {
            self.gauge.set(self.topics.len() as f64);
        }
        resumed
    }

    /// Each stopped table with why, for `/status`.
    pub fn describe(&self) -> Vec<String> {
        let now = Instant::now();
        self.topics
            .iter()
            .map(|(topic, s)| {
                format!(
                    "{} (topic {topic}): {}; tried again in {:.0} s",
                    s.table,
                    s.error,
                    s.retry_at.saturating_duration_since(now).as_secs_f64()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_table_waits_longer_each_time_until_a_batch_of_it_applies() {
        let mut s = StoppedTables::new("test");
        assert!(!s.blocks("t"));
        assert_eq!(s.stop("t", "public.t", "cannot cast"), FIRST_WAIT);
        assert!(s.blocks("t") && !s.blocks("u"));
        assert_eq!(s.stop("t", "public.t", "cannot cast"), FIRST_WAIT * 2);
        assert!(s.describe()[0].starts_with("public.t (topic t): cannot cast"));
        for _ in 0..10 {
            s.stop("t", "public.t", "cannot cast");
        }
        assert_eq!(s.stop("t", "public.t", "cannot cast"), LONGEST_WAIT);
        assert!(s.applied(["u"].into_iter()).is_empty());
        assert_eq!(
            s.applied(["u", "t"].into_iter()),
            vec!["public.t".to_string()]
        );
        assert!(!s.blocks("t") && s.describe().is_empty());
    }
}
