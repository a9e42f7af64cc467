//! What the workload committed, and the checks of what Kafka and the target showed against it.
//!
//! ```text
//! Kafka topics ──► KafkaEvent (deduplicated by position) ──────┐
//!      └─────────► DropMarks (drop announcements) ─────────────┼─► check_drops ──────┐
//! workload ──(tx, effects)──► History ─┬─ events, (table) gaps ─┴─► check_kafka ──────┤
//!                                      └─ states ──────────────┐                     ├─► Findings
//! target samples ──► Observed (states seen per key) ───────────┴─► check_observed ───┘
//! ```
//!
//! A gap is a window of transactions around a slot drop: the daemon re-snapshots, so their row
//! events may be missing on Kafka (the new snapshot carries their rows). Gaps excuse missing
//! events there and nothing else: not a doubled event, not one out of order, not a stale state.
//! A table gap is the same for one table: `late`, from its creation to its read (the daemon
//! adds it to its publication only then; its rows until its read reach Kafka as the read's
//! rows, not as row events).
//!
//! `gone` is dropped at the source: the target keeps it (`on_table_drop = "keep"`), so it ends
//! equal to the history's last state of each key, and its topic must carry the drop's
//! announcement on every partition, after every row event of the table ([`check_drops`]).

use std::collections::{BTreeSet, HashMap, HashSet};

pub(crate) type Key = (usize, String);

/// How many tables the workload writes (some only for a while: see [`LATE`], [`GONE`]).
pub(crate) const N_TABLES: usize = 6;

/// Tables of the workload: (name, key columns).
pub(crate) const TABLES: [(&str, &str); N_TABLES] = [
    ("acct", "id"),
    ("line", "o, n"),
    ("doc", "id"),
    ("txlog", "id"),
    ("late", "id"),
    ("gone", "id"),
];

/// `late (id, v)`: created by the workload while the clone runs, at a transaction drawn from
/// the seed; the daemon finds it by its catalog check and reads it like a resync.
pub(crate) const LATE: usize = 4;
/// `gone (id, v)`: there from the start (in the initial snapshot), dropped by the workload at a
/// transaction drawn from the seed.
pub(crate) const GONE: usize = 5;

/// A sample of the target: per table its rows as key → version, `None` where the table was not
/// looked at (`late` before its read, or not there yet).
pub(crate) type Sample = [Option<HashMap<String, i64>>; N_TABLES];

/// What the workload committed, per key: every state in commit order (`None`: no row), and
/// the row events alone (truncates remove rows without an event per key), each with the number
/// of the transaction that committed it.
#[derive(Default)]
pub(crate) struct History {
    pub(crate) states: HashMap<Key, Vec<Option<i64>>>,
    pub(crate) events: HashMap<Key, Vec<(u64, Option<i64>)>>,
    /// Keys with a row now, per table (`gone`'s stay after its drop: the target keeps them).
    pub(crate) live: [Vec<String>; N_TABLES],
    /// Transactions committed so far; the n-th one is number n.
    pub(crate) committed_tx: u64,
    /// The large transaction committed (and the SIGKILL meant for it is still to come).
    pub(crate) large_committed: bool,
    pub(crate) indeterminate: u64,
    /// Slot-drop windows `(start, end)` of transaction numbers: `start` was counted before the
    /// slot was dropped, once the slot had confirmed it (Kafka had it and all before it), `end`
    /// once the new snapshot was recorded and applied. Both ends are included, to be safe.
    pub(crate) gaps: Vec<(u64, u64)>,
    /// Gaps of one table `(table, start, end)`: `late` from the transaction that created it to
    /// one counted once its read was on Kafka (every transaction before the read's snapshot
    /// is in its rows, every one after it streams).
    pub(crate) table_gaps: Vec<(usize, u64, u64)>,
    /// The transaction that created `late`, once it committed.
    pub(crate) late_created: Option<u64>,
    /// The transaction that dropped `gone`, once it committed. The drop is no effect on the
    /// keys: the target keeps the rows the table had.
    pub(crate) gone_dropped: Option<u64>,
}

/// One effect of a transaction on a key.
#[derive(Clone)]
pub(crate) enum Effect {
    Put(usize, String, i64),
    Delete(usize, String),
    /// Every row of the table gone.
    Truncate(usize),
}

impl History {
    /// Records the effects of transaction number `tx` (0: the rows there before the workload).
    pub(crate) fn record(&mut self, tx: u64, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Put(t, k, v) => {
                    let key = (*t, k.clone());
                    let was_live = self
                        .states
                        .get(&key)
                        .and_then(|s| s.last().copied())
                        .flatten()
                        .is_some();
                    self.states.entry(key.clone()).or_default().push(Some(*v));
                    self.events.entry(key).or_default().push((tx, Some(*v)));
                    if !was_live {
                        self.live[*t].push(k.clone());
                    }
                }
                Effect::Delete(t, k) => {
                    let key = (*t, k.clone());
                    self.states.entry(key.clone()).or_default().push(None);
                    self.events.entry(key).or_default().push((tx, None));
                    self.live[*t].retain(|x| x != k);
                }
                Effect::Truncate(t) => {
                    for k in std::mem::take(&mut self.live[*t]) {
                        self.states.entry((*t, k)).or_default().push(None);
                    }
                }
            }
        }
    }

    /// Whether a row event of table `t` of transaction `tx` may be missing on Kafka: it lies
    /// in a gap, or in a gap of its table.
    pub(crate) fn excusable(&self, t: usize, tx: u64) -> bool {
        self.gaps
            .iter()
            .any(|(start, end)| (*start..=*end).contains(&tx))
            || self
                .table_gaps
                .iter()
                .any(|(table, start, end)| *table == t && (*start..=*end).contains(&tx))
    }

    /// Table `t`'s rows as the committed transactions left them: key → version.
    pub(crate) fn final_rows(&self, t: usize) -> HashMap<String, i64> {
        self.states
            .iter()
            .filter(|((table, _), _)| *table == t)
            .filter_map(|((_, k), s)| s.last().copied().flatten().map(|v| (k.clone(), v)))
            .collect()
    }
}

/// Per key, the target states seen, in the order seen (each change of state once).
#[derive(Default)]
pub(crate) struct Observed {
    pub(crate) seen: HashMap<Key, Vec<Option<i64>>>,
    pub(crate) last: [HashMap<String, i64>; N_TABLES],
}

impl Observed {
    /// Adds a sample. A table the sample did not look at keeps its last state: its next look
    /// is compared with the one before.
    pub(crate) fn add(&mut self, now: Sample) {
        for (t, current) in now.into_iter().enumerate() {
            let Some(current) = current else { continue };
            for (k, v) in &current {
                if self.last[t].get(k) != Some(v) {
                    self.seen.entry((t, k.clone())).or_default().push(Some(*v));
                }
            }
            for k in self.last[t].keys() {
                if !current.contains_key(k) {
                    self.seen.entry((t, k.clone())).or_default().push(None);
                }
            }
            self.last[t] = current;
        }
    }
}

/// One row event read back from Kafka: the state it gives its key, and its identity (topic,
/// source position, key, state). A re-send has the same identity, and so do a delete and its
/// tombstone. A key change closes the old key with a tombstone in the old key's partition,
/// which keeps each key's records in one partition, in order.
pub(crate) struct KafkaEvent {
    pub(crate) key: Key,
    pub(crate) version: Option<i64>,
    pub(crate) identity: (String, u64, u64, String, Option<i64>),
}

/// The drop announcements on one table's topic (truncates with the header `bitclone9.dropped`).
#[derive(Default, Debug)]
pub(crate) struct DropMarks {
    pub(crate) table: usize,
    /// The topic's partitions (looked up for `gone` only: the one table that must have them).
    pub(crate) partitions: usize,
    /// Announcements read, re-sends included.
    pub(crate) markers: usize,
    /// Partitions with an announcement.
    pub(crate) marked: BTreeSet<i32>,
    /// Keys of row events first sent after the last announcement of their partition (a
    /// re-send of an event sent before it, by a source that restarted behind the drop's
    /// position, is no new change and not counted).
    pub(crate) after: Vec<String>,
}

#[derive(Default, Debug)]
pub(crate) struct Findings {
    pub(crate) changes: usize,
    pub(crate) lost: usize,
    pub(crate) doubled: usize,
    pub(crate) misordered: usize,
    pub(crate) stale_or_unknown_states: usize,
    /// Tables whose columns (names, types, order) differ between source and target.
    pub(crate) divergent_columns: usize,
    pub(crate) divergent_rows: usize,
    /// Committed row events missing on Kafka inside a gap (a new snapshot or `late`'s read
    /// carried their rows).
    pub(crate) excused: usize,
    pub(crate) examples: Vec<String>,
}

impl Findings {
    pub(crate) fn note(&mut self, s: String) {
        if self.examples.len() < 20 {
            self.examples.push(s);
        }
    }
}

/// Checks (1) and (2): Kafka holds every committed row event once (re-sends deduplicated by
/// their position), per key in commit order. Inside a gap an event may be missing, nothing more.
pub(crate) fn check_kafka(h: &History, events: Vec<KafkaEvent>, f: &mut Findings) {
    let mut seen_pos = HashSet::new();
    let mut per_key: HashMap<Key, Vec<Option<i64>>> = HashMap::new();
    for e in events {
        if !seen_pos.insert(e.identity.clone()) {
            continue; // sent again after a restart, or a delete's tombstone
        }
        per_key.entry(e.key).or_default().push(e.version);
    }
    for (key, committed) in &h.events {
        f.changes += committed.len();
        let got = per_key.remove(key).unwrap_or_default();
        let v = compare_key(committed, &got, &|tx| h.excusable(key.0, tx));
        f.lost += v.lost;
        f.doubled += v.doubled;
        f.misordered += v.misordered;
        f.excused += v.excused;
        if !v.fits() {
            f.note(format!(
                "{} key {}: committed (tx, version) {committed:?}, on Kafka {got:?}",
                TABLES[key.0].0, key.1
            ));
        }
    }
    for (key, got) in per_key {
        f.doubled += got.len();
        f.note(format!(
            "{} key {}: on Kafka {got:?} but never committed",
            TABLES[key.0].0, key.1
        ));
    }
}

/// The drop announcements: `gone`, once dropped, has one on every partition of its topic, and
/// no row event of it was first sent after the last one of its partition (the announcement
/// follows every change of the table, those of the dropping transaction included). A table not
/// dropped has none. A missing announcement counts as lost, one before a change as misordered,
/// one of a table not dropped as doubled.
pub(crate) fn check_drops(h: &History, marks: &[DropMarks], f: &mut Findings) {
    for m in marks {
        let name = TABLES[m.table].0;
        if m.table != GONE || h.gone_dropped.is_none() {
            if m.markers > 0 {
                f.doubled += m.markers;
                f.note(format!(
                    "{name}: {} drop announcements on Kafka, but the table was not dropped",
                    m.markers
                ));
            }
            continue;
        }
        let unmarked: Vec<i32> = (0..m.partitions as i32)
            .filter(|p| !m.marked.contains(p))
            .collect();
        if !unmarked.is_empty() {
            f.lost += unmarked.len();
            f.note(format!(
                "{name}: dropped, but no drop announcement on partitions {unmarked:?} of {}",
                m.partitions
            ));
        }
        if !m.after.is_empty() {
            f.misordered += m.after.len();
            f.note(format!(
                "{name}: row events first sent after the drop announcement of their partition, keys {:?}",
                m.after
            ));
        }
    }
}

/// How one key's events on Kafka compare with its committed ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct KeyVerdict {
    lost: usize,
    doubled: usize,
    misordered: usize,
    /// Committed events missing on Kafka that a gap excuses.
    excused: usize,
}

impl KeyVerdict {
    /// Kafka's events are the committed ones, in order, but for excused ones.
    fn fits(&self) -> bool {
        self.lost == 0 && self.doubled == 0 && self.misordered == 0
    }
}

/// Compares one key's committed events (transaction number, version) with the versions Kafka
/// holds for it (deduplicated, in Kafka's order). They fit when Kafka's are a subsequence of the
/// committed ones that leaves out only events `excusable` lets go: without gaps, exactly the
/// committed ones. Otherwise the counts say how they differ: committed but not on Kafka (lost,
/// unless excusable), on Kafka more often than committed (doubled), or neither, so out of order
/// (misordered). Without gaps the counts are those of the check before gaps existed.
fn compare_key(
    committed: &[(u64, Option<i64>)],
    got: &[Option<i64>],
    excusable: &dyn Fn(u64) -> bool,
) -> KeyVerdict {
    if fits_leaving_out(committed, got, excusable) {
        return KeyVerdict {
            excused: committed.len() - got.len(),
            ..KeyVerdict::default()
        };
    }
    // Versions of rows are unique (each put draws a new one), deletions are not: those are
    // compared by their number.
    let have: Vec<&Option<i64>> = got.iter().filter(|v| v.is_some()).collect();
    let have_set: HashSet<&Option<i64>> = have.iter().copied().collect();
    let mut lost = 0;
    let mut excused = 0;
    let mut counted: HashSet<&Option<i64>> = HashSet::new();
    for (tx, version) in committed.iter().filter(|e| e.1.is_some()) {
        if !have_set.contains(version) && counted.insert(version) {
            if excusable(*tx) {
                excused += 1;
            } else {
                lost += 1;
            }
        }
    }
    let deletes_got = got.iter().filter(|v| v.is_none()).count();
    let deletes_committed = committed.iter().filter(|e| e.1.is_none()).count();
    let deletes_needed = committed
        .iter()
        .filter(|e| e.1.is_none() && !excusable(e.0))
        .count();
    let deletes_lost = deletes_needed.saturating_sub(deletes_got);
    lost += deletes_lost;
    excused += deletes_committed
        .saturating_sub(deletes_got)
        .saturating_sub(deletes_lost);
    let doubled = have.len() - have_set.len() + deletes_got.saturating_sub(deletes_committed);
    KeyVerdict {
        lost,
        doubled,
        misordered: usize::from(lost == 0 && doubled == 0),
        excused,
    }
}

/// Whether `got` is the versions of `committed`, in order, with nothing left out but events of
/// transactions `excusable` lets go. A plain greedy match is not enough: a key deleted, put
/// again and deleted once more could match its one delete on Kafka to the first one.
fn fits_leaving_out(
    committed: &[(u64, Option<i64>)],
    got: &[Option<i64>],
    excusable: &dyn Fn(u64) -> bool,
) -> bool {
    if got.len() > committed.len() {
        return false;
    }
    let m = got.len();
    // fit[j]: the committed events from the current one on can yield got[j..]. Before the
    // first pass (no committed events left) only the empty rest fits.
    let mut fit = vec![false; m + 1];
    fit[m] = true;
    for &(tx, version) in committed.iter().rev() {
        let skip = excusable(tx);
        // Ascending, so that fit[j + 1] is still the value of the pass before.
        for j in 0..=m {
            let take = j < m && got[j] == version && fit[j + 1];
            fit[j] = take || (skip && fit[j]);
        }
    }
    fit[0]
}

/// Check (4): every target state seen is a committed state of its key, at or after the one
/// seen before.
pub(crate) fn check_observed(h: &History, o: &Observed, f: &mut Findings) {
    for (key, seen) in &o.seen {
        let Some(states) = h.states.get(key) else {
            f.stale_or_unknown_states += 1;
            f.note(format!(
                "{} key {}: target showed {seen:?}, never committed",
                TABLES[key.0].0, key.1
            ));
            continue;
        };
        let mut at = 0usize;
        let mut seen_a_row = false;
        for s in seen {
            let next = match s {
                Some(_) => states[at..].iter().position(|x| x == s).map(|i| at + i),
                // An absent row before any row was seen: not applied yet (no claim on where
                // the key stands). After a row: the state seen, or a later deletion.
                None if !seen_a_row => Some(at),
                None => states[at..]
                    .iter()
                    .position(|x| x.is_none())
                    .map(|i| at + i),
            };
            seen_a_row |= s.is_some();
            match next {
                Some(i) => at = i,
                None => {
                    f.stale_or_unknown_states += 1;
                    f.note(format!(
                        "{} key {}: target went to {s:?} after {:?}; committed {states:?}",
                        TABLES[key.0].0,
                        key.1,
                        states.get(at)
                    ));
                    break;
                }
            }
        }
    }
}

/// The Kafka check on hand-made histories of one key (no stack needed).
#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        (0, "1".to_string())
    }

    /// One key's committed events (transaction number, version) and the gaps.
    fn history(events: &[(u64, Option<i64>)], gaps: &[(u64, u64)]) -> History {
        History {
            events: HashMap::from([(key(), events.to_vec())]),
            gaps: gaps.to_vec(),
            ..History::default()
        }
    }

    /// The key's records on Kafka as (source position, version): a re-send repeats both.
    fn check(h: &History, on_kafka: &[(u64, Option<i64>)]) -> Findings {
        let events = on_kafka
            .iter()
            .map(|&(lsn, version)| KafkaEvent {
                key: key(),
                version,
                identity: ("acct".to_string(), lsn, 0, "1".to_string(), version),
            })
            .collect();
        let mut f = Findings::default();
        check_kafka(h, events, &mut f);
        f
    }

    /// (lost, doubled, misordered, excused)
    fn counts(f: &Findings) -> (usize, usize, usize, usize) {
        (f.lost, f.doubled, f.misordered, f.excused)
    }

    #[test]
    fn kafka_check_counts_a_missing_event_as_lost_outside_a_gap() {
        let committed = [(1, Some(10)), (2, Some(11)), (3, None)];
        let kafka = [(100, Some(10)), (300, None)];
        let f = check(&history(&committed, &[]), &kafka);
        assert_eq!(counts(&f), (1, 0, 0, 0));
        assert_eq!(f.changes, 3);
        assert_eq!(f.examples.len(), 1, "{:?}", f.examples);
        // A gap elsewhere excuses nothing.
        let f = check(&history(&committed, &[(3, 9)]), &kafka);
        assert_eq!(counts(&f), (1, 0, 0, 0));
        // Everything there, sent twice (re-sends, a delete's tombstone): clean.
        let sent = [(100, Some(10)), (200, Some(11)), (300, None)];
        let twice: Vec<(u64, Option<i64>)> = sent.iter().chain(&sent).copied().collect();
        let f = check(&history(&committed, &[]), &twice);
        assert_eq!(counts(&f), (0, 0, 0, 0));
        assert!(f.examples.is_empty(), "{:?}", f.examples);
    }

    #[test]
    fn kafka_check_excuses_missing_events_inside_a_gap() {
        let committed = [(1, Some(10)), (2, Some(11)), (3, None)];
        let h = history(&committed, &[(2, 2)]);
        let f = check(&h, &[(100, Some(10)), (300, None)]);
        assert_eq!(counts(&f), (0, 0, 0, 1));
        assert!(f.examples.is_empty(), "{:?}", f.examples);
        // Deleted, put again and deleted once more, the first two inside the gap: Kafka's one
        // delete is the last one.
        let committed = [(1, Some(10)), (4, None), (5, Some(11)), (9, None)];
        let h = history(&committed, &[(3, 6)]);
        let f = check(&h, &[(100, Some(10)), (900, None)]);
        assert_eq!(counts(&f), (0, 0, 0, 2));
        // The delete outside the gap missing is lost all the same.
        let f = check(&h, &[(100, Some(10))]);
        assert_eq!(counts(&f), (1, 0, 0, 2));
    }

    #[test]
    fn kafka_check_counts_misordered_and_doubled_events_also_inside_a_gap() {
        let committed = [(1, Some(10)), (2, Some(11))];
        let windows: [Vec<(u64, u64)>; 2] = [vec![], vec![(1, 2)]];
        for gaps in windows {
            let h = history(&committed, &gaps);
            let f = check(&h, &[(200, Some(11)), (100, Some(10))]);
            assert_eq!(counts(&f), (0, 0, 1, 0), "gaps {gaps:?}");
            // Sent twice at different positions: doubled, not a re-send.
            let f = check(&h, &[(100, Some(10)), (150, Some(10)), (200, Some(11))]);
            assert_eq!(counts(&f), (0, 1, 0, 0), "gaps {gaps:?}");
        }
    }

    #[test]
    fn kafka_check_excuses_a_table_gap_for_its_table_only() {
        let committed = [(1, Some(10)), (2, Some(11)), (3, Some(12))];
        let mut h = history(&committed, &[]);
        // `late` read after transaction 2: its first two versions came as the read's rows.
        h.table_gaps.push((LATE, 1, 2));
        let late = (LATE, "1".to_string());
        h.events = HashMap::from([
            (late.clone(), committed.to_vec()),
            (key(), committed.to_vec()),
        ]);
        let events = [(key(), 300, Some(12)), (late, 300, Some(12))]
            .into_iter()
            .map(|(k, lsn, version)| KafkaEvent {
                identity: (TABLES[k.0].0.to_string(), lsn, 0, k.1.clone(), version),
                key: k,
                version,
            })
            .collect();
        let mut f = Findings::default();
        check_kafka(&h, events, &mut f);
        // acct's key lost two events; late's two are excused.
        assert_eq!(counts(&f), (2, 0, 0, 2));
    }

    #[test]
    fn drop_check_wants_an_announcement_on_every_partition_after_every_change() {
        let marks = |marked: &[i32], after: &[&str], markers: usize| DropMarks {
            table: GONE,
            partitions: 3,
            markers,
            marked: marked.iter().copied().collect(),
            after: after.iter().map(|k| k.to_string()).collect(),
        };
        let dropped = History {
            gone_dropped: Some(7),
            ..History::default()
        };
        let mut f = Findings::default();
        check_drops(&dropped, &[marks(&[0, 1, 2], &[], 4)], &mut f);
        assert_eq!(counts(&f), (0, 0, 0, 0), "{:?}", f.examples);
        let mut f = Findings::default();
        check_drops(&dropped, &[marks(&[0, 2], &["5"], 2)], &mut f);
        assert_eq!(counts(&f), (1, 0, 1, 0));
        // Not dropped: any announcement is one too many.
        let mut f = Findings::default();
        check_drops(&History::default(), &[marks(&[1], &[], 1)], &mut f);
        assert_eq!(counts(&f), (0, 1, 0, 0));
    }

    #[test]
    fn a_table_not_looked_at_keeps_its_last_state() {
        let mut o = Observed::default();
        let rows = |pairs: &[(&str, i64)]| -> HashMap<String, i64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let mut s: Sample = Default::default();
        s[LATE] = Some(rows(&[("1", 10), ("2", 20)]));
        o.add(s);
        // Not looked at (paused): no claim that its rows went.
        o.add(Default::default());
        let mut s: Sample = Default::default();
        s[LATE] = Some(rows(&[("1", 11)]));
        o.add(s);
        let late = |k: &str| o.seen.get(&(LATE, k.to_string())).cloned();
        assert_eq!(late("1"), Some(vec![Some(10), Some(11)]));
        assert_eq!(late("2"), Some(vec![Some(20), None]));
    }
}
