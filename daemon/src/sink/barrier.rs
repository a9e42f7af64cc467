//! The partition barrier: a record that every partition of a topic carries, and that none may
//! pass before all of them reached it.
//!
//! - A source truncate (a `TRUNCATE`, or the truncate opening a table's snapshot or resync) is
//!   written to every partition of the table's topic, and empties the whole target table. It
//!   may only be applied once every partition has reached it, or rows of one partition applied
//!   before it would be removed by the truncate of another.
//! - A shape barrier is written to every partition just before the first change whose column
//!   types differ. Nothing after it is applied before every partition applied its events of
//!   the old types, so no value of an old type meets a column already changed (by the sink's
//!   cast, or by an operator's `USING` expression that the sink cannot repeat).
//!
//! ```text
//!  p0: … r r B r r ──┐ held (paused) at B
//!  p1: … r B r r r ──┼──► every partition 0..n at B (or past it) ──► B once, then what followed
//!  p2: … r r r r B ──┘
//! ```
//!
//! `n` is the count the source wrote the barrier to, carried in its `bitclone9.partitions`
//! header, not the partitions the sink happens to know of: a partition of a new topic that the
//! sink has not discovered yet (metadata still short on a broker that is loading) is waited
//! for, never passed over. Held partitions are paused, which bounds what is held in memory.
//!
//! The barrier does no I/O: it says which partitions to pause and resume, so its whole logic is
//! tested on records made in the test.

use super::Item;
use bitclone9_postgres_sink::{Applied, Watermark};
use rdkafka::message::{Headers, Message};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use bitclone9_kafka::TRUNCATE_FANOUT_HEADER as FANOUT_HEADER;

type Partition = (String, i32);

/// What one call to [`PartitionBarrier::route`] decided.
#[derive(Default)]
pub struct Routed {
    /// Items to apply now, in order.
    pub ready: Vec<Item>,
    /// Partitions now held at a barrier: stop fetching them.
    pub pause: Vec<Partition>,
    /// Partitions released: fetch them again.
    pub resume: Vec<Partition>,
}

#[derive(Default)]
pub struct PartitionBarrier {
    /// Partitions stopped at a barrier (the first item), with what arrived after it.
    held: BTreeMap<Partition, VecDeque<Item>>,
}

/// How many partitions a barrier was written to: its header, or (truncates written before the
/// header existed) the partitions of the topic the sink knows of.
fn fanout(item: &Item, assigned: &HashSet<Partition>) -> usize {
    let from_header = item.msg.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == FANOUT_HEADER)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<usize>().ok())
    });
    from_header.unwrap_or_else(|| {
        let topic = item.msg.topic();
        assigned.iter().filter(|(t, _)| t == topic).count()
    })
}

impl PartitionBarrier {
    /// Lets go of what is held of `topic` (its partitions are given up: read again later from
    /// the target's positions).
    pub fn forget(&mut self, topic: &str) {
        self.held.retain(|(t, _), _| t != topic);
    }

    /// Partitions held at a barrier now.
    pub fn held(&self) -> impl Iterator<Item = &Partition> {
        self.held.keys()
    }

    /// Takes newly consumed items; returns those that may be applied now, in order, and holds
    /// the rest. `applied` is what the target holds of each partition; `assigned` the
    /// partitions the sink reads (only for truncates without the fan-out header).
    pub fn route(
        &mut self,
        items: Vec<Item>,
        applied: &HashMap<Partition, Applied>,
        assigned: &HashSet<Partition>,
    ) -> Routed {
        let mut out = Routed::default();
        self.route_into(items, applied, assigned, &mut out);
        out
    }

    fn route_into(
        &mut self,
        items: Vec<Item>,
        applied: &HashMap<Partition, Applied>,
        assigned: &HashSet<Partition>,
        out: &mut Routed,
    ) {
        for item in items {
            let barrier = item.barrier();
            if barrier.is_none() && self.held.is_empty() {
                // The common case: nothing is held, and this is no barrier.
                out.ready.push(item);
                continue;
            }
            let key = (item.msg.topic().to_string(), item.msg.partition());
            if let Some(q) = self.held.get_mut(&key) {
                q.push_back(item);
                continue;
            }
            let done = applied.get(&key).copied();
            let covered = |w: Watermark| {
                done.is_some_and(|a| item.msg.offset() <= a.offset || w <= a.watermark)
            };
            match barrier {
                Some(w) if !covered(w) && fanout(&item, assigned) > 1 => {
                    out.pause.push(key.clone());
                    self.held.insert(key, VecDeque::from([item]));
                }
                _ => out.ready.push(item),
            }
        }
        // Release every topic whose partitions all stand at the same barrier (or are past it).
        let topics: Vec<String> = {
            let mut t: Vec<String> = self.held.keys().map(|(t, _)| t.clone()).collect();
            t.dedup();
            t
        };
        for topic in topics {
            let fronts: Vec<(i32, Watermark, usize)> = self
                .held
                .iter()
                .filter(|((t, _), _)| *t == topic)
                .filter_map(|((_, p), q)| {
                    let front = q.front()?;
                    Some((*p, front.barrier()?, fanout(front, assigned)))
                })
                .collect();
            let Some(&(_, w, n)) = fronts.iter().min_by_key(|(_, w, _)| *w) else {
                continue;
            };
            // A partition held at a later barrier is past this one (it never got it: e.g. a
            // snapshot cut short before its truncate reached every partition). A partition
            // whose target position is at or past the barrier has applied it already: records
            // of a partition arrive in order, and the barrier came before anything later.
            let complete = (0..n as i32).all(|p| {
                let at_or_later = fronts.iter().any(|(q, fw, _)| *q == p && *fw >= w);
                let past = applied
                    .get(&(topic.clone(), p))
                    .is_some_and(|a| a.watermark >= w);
                at_or_later || past
            });
            if !complete {
                continue;
            }
            let mut released: Vec<Item> = Vec::new();
            let mut rest: Vec<Item> = Vec::new();
            for (p, fw, _) in fronts {
                if fw != w {
                    continue;
                }
                let key = (topic.clone(), p);
                if let Some(mut q) = self.held.remove(&key) {
                    if let Some(t) = q.pop_front() {
                        released.push(t);
                    }
                    rest.extend(q);
                    out.resume.push(key);
                }
            }
            tracing::debug!(topic = %topic, partitions = released.len(), "every partition reached the barrier: applying it");
            out.ready.extend(released);
            // What followed may hold another barrier: route it again.
            self.route_into(rest, applied, assigned, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitclone9_core::{Change, Lsn, Op, SnapshotMark, TableId, TableSchema, TxInfo};
    use bitclone9_kafka::decode::Decoded;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    const TOPIC: &str = "db.public.t";

    fn msg(partition: i32, offset: i64, fanout: Option<usize>) -> OwnedMessage {
        let headers = fanout.map(|n| {
            OwnedHeaders::new().insert(Header {
                key: FANOUT_HEADER,
                value: Some(&n.to_string()),
            })
        });
        OwnedMessage::new(
            Some(vec![1]),
            None,
            TOPIC.into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            headers,
        )
    }

    fn change(op: Op, lsn: u64, seq: u64, snapshot: bool) -> Change {
        Change {
            table: std::sync::Arc::new(TableSchema {
                id: TableId::new("public", "t"),
                relation_id: 1,
                columns: Vec::new(),
            }),
            op,
            before: None,
            after: None,
            tx: TxInfo {
                xid: None,
                commit_lsn: Lsn(lsn),
                commit_time_us: 0,
            },
            seq,
            snapshot: if snapshot {
                SnapshotMark::Yes
            } else {
                SnapshotMark::No
            },
        }
    }

    /// The snapshot-opening truncate at `lsn`, on `partition`, written to `n` partitions.
    fn truncate(partition: i32, offset: i64, lsn: u64, n: Option<usize>) -> Item {
        Item {
            msg: msg(partition, offset, n),
            decoded: Ok(Decoded::Change(change(Op::Truncate, lsn, 0, true))),
        }
    }

    fn row(partition: i32, offset: i64, lsn: u64, seq: u64) -> Item {
        Item {
            msg: msg(partition, offset, None),
            decoded: Ok(Decoded::Change(change(Op::Read, lsn, seq, true))),
        }
    }

    fn parts(n: i32) -> HashSet<Partition> {
        (0..n).map(|p| (TOPIC.to_string(), p)).collect()
    }

    fn offsets(items: &[Item]) -> Vec<(i32, i64)> {
        items
            .iter()
            .map(|i| (i.msg.partition(), i.msg.offset()))
            .collect()
    }

    /// Applies what was released: the positions of the applied items.
    fn apply(applied: &mut HashMap<Partition, Applied>, ready: &[Item]) {
        for i in ready {
            let w = i.watermark().unwrap_or_default();
            applied.insert(
                (i.msg.topic().to_string(), i.msg.partition()),
                Applied {
                    offset: i.msg.offset(),
                    watermark: w,
                },
            );
        }
    }

    #[test]
    fn a_partition_the_sink_does_not_know_yet_is_waited_for() {
        // A new topic of 3 partitions; the sink's metadata lists only 1 and 2 (partition 0 is
        // discovered after the first batch). The truncate says it went to 3 partitions.
        let mut b = PartitionBarrier::default();
        let mut applied = HashMap::new();
        let known: HashSet<Partition> = [(TOPIC.to_string(), 1), (TOPIC.to_string(), 2)].into();
        let first = b.route(
            vec![
                truncate(1, 0, 100, Some(3)),
                row(1, 1, 100, 1),
                truncate(2, 0, 100, Some(3)),
                row(2, 1, 100, 2),
            ],
            &applied,
            &known,
        );
        assert!(
            first.ready.is_empty(),
            "nothing before partition 0 has the truncate"
        );
        assert_eq!(first.pause.len(), 2);
        apply(&mut applied, &first.ready);
        // Partition 0 arrives late, with its truncate and rows.
        let second = b.route(
            vec![truncate(0, 0, 100, Some(3)), row(0, 1, 100, 3)],
            &applied,
            &parts(3),
        );
        let got = offsets(&second.ready);
        assert_eq!(
            &got[..3],
            &[(0, 0), (1, 0), (2, 0)],
            "the truncates first: {got:?}"
        );
        assert_eq!(got.len(), 6, "then every row: {got:?}");
        assert_eq!(second.resume.len(), 3);
        assert_eq!(b.held().count(), 0);
    }

    #[test]
    fn rows_applied_elsewhere_never_stand_for_a_missing_truncate() {
        // Partitions 1 and 2 have their truncates and rows applied together; partition 0's
        // truncate comes later. Had the barrier counted only partitions 1 and 2 (all it knew),
        // the late truncate would then empty the table of their rows.
        let mut b = PartitionBarrier::default();
        let mut applied = HashMap::new();
        let r = b.route(
            vec![truncate(1, 0, 100, Some(3)), truncate(2, 0, 100, Some(3))],
            &applied,
            &parts(2),
        );
        assert!(r.ready.is_empty());
        apply(&mut applied, &r.ready);
        // A first batch of rows of partition 1 behind its truncate: still held.
        let r = b.route(vec![row(1, 1, 100, 1)], &applied, &parts(3));
        assert!(r.ready.is_empty());
        let r = b.route(vec![truncate(0, 0, 100, Some(3))], &applied, &parts(3));
        assert_eq!(offsets(&r.ready), vec![(0, 0), (1, 0), (2, 0), (1, 1)]);
    }

    #[test]
    fn any_arrival_order_releases_the_truncates_together_and_before_their_rows() {
        // Every order in which three partitions' truncates and rows can arrive, one record per
        // batch: the truncates are always released in one batch, before any row behind them.
        let per_partition: Vec<Vec<Item>> = (0..3)
            .map(|p| vec![truncate(p, 0, 100, Some(3)), row(p, 1, 100, p as u64 + 1)])
            .collect();
        let n_orders = interleavings(&[2, 2, 2]);
        assert_eq!(n_orders.len(), 90);
        for order in n_orders {
            let mut queues: Vec<VecDeque<Item>> = per_partition
                .iter()
                .map(|q| q.iter().map(clone_item).collect())
                .collect();
            let mut b = PartitionBarrier::default();
            let mut applied = HashMap::new();
            let mut batches: Vec<Vec<(i32, i64)>> = Vec::new();
            for p in order {
                let Some(item) = queues[p].pop_front() else {
                    continue;
                };
                let r = b.route(vec![item], &applied, &parts(3));
                apply(&mut applied, &r.ready);
                if !r.ready.is_empty() {
                    batches.push(offsets(&r.ready));
                }
            }
            let flat: Vec<(i32, i64)> = batches.iter().flatten().copied().collect();
            assert_eq!(flat.len(), 6, "{batches:?}");
            let truncates = batches
                .iter()
                .find(|b| b.iter().any(|(_, o)| *o == 0))
                .cloned()
                .unwrap_or_default();
            let mut t: Vec<_> = truncates.iter().filter(|(_, o)| *o == 0).collect();
            t.sort();
            assert_eq!(t.len(), 3, "one batch releases all truncates: {batches:?}");
            let first_truncate = flat.iter().position(|(_, o)| *o == 0).unwrap_or(0);
            assert!(
                flat[..first_truncate].is_empty(),
                "no row before the truncates: {batches:?}"
            );
        }
    }

    #[test]
    fn a_partition_past_the_truncate_or_at_a_later_one_does_not_block_it() {
        let mut applied = HashMap::new();
        // Partition 2 already applied this truncate and rows after it (before a restart).
        applied.insert(
            (TOPIC.to_string(), 2),
            Applied {
                offset: 5,
                watermark: Watermark::of(&change(Op::Read, 100, 7, true)),
            },
        );
        let mut b = PartitionBarrier::default();
        // Partition 1 holds a later truncate only (the first one's fan-out was cut short).
        let r = b.route(
            vec![truncate(0, 0, 100, Some(3)), truncate(1, 0, 200, Some(3))],
            &applied,
            &parts(3),
        );
        assert_eq!(offsets(&r.ready), vec![(0, 0)]);
        assert_eq!(
            b.held().count(),
            1,
            "partition 1 waits at the later truncate"
        );
    }

    #[test]
    fn a_single_partition_topic_needs_no_barrier() {
        let mut b = PartitionBarrier::default();
        let r = b.route(
            vec![truncate(0, 0, 100, Some(1)), row(0, 1, 100, 1)],
            &HashMap::new(),
            &parts(1),
        );
        assert_eq!(offsets(&r.ready), vec![(0, 0), (0, 1)]);
        assert!(r.pause.is_empty());
    }

    /// A shape barrier on `partition`, before the streamed change (`lsn`, `seq`) of new column
    /// types, written to `n` partitions.
    fn shape_barrier(partition: i32, offset: i64, lsn: u64, seq: u64, n: usize) -> Item {
        barrier_before(partition, offset, lsn, seq, n, "streamed")
    }

    /// The same before a change read by a snapshot (`kind` = `snapshot`).
    fn barrier_before(
        partition: i32,
        offset: i64,
        lsn: u64,
        seq: u64,
        n: usize,
        kind: &str,
    ) -> Item {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: FANOUT_HEADER,
                value: Some(&n.to_string()),
            })
            .insert(Header {
                key: bitclone9_kafka::SHAPE_BARRIER_HEADER,
                value: Some(kind),
            })
            .insert(Header {
                key: "bitclone9.lsn",
                value: Some(&Lsn(lsn).to_string()),
            })
            .insert(Header {
                key: "bitclone9.seq",
                value: Some(&seq.to_string()),
            });
        Item {
            msg: OwnedMessage::new(
                None,
                None,
                TOPIC.into(),
                Timestamp::NotAvailable,
                partition,
                offset,
                Some(headers),
            ),
            decoded: Ok(Decoded::Tombstone(None)),
        }
    }

    fn streamed(partition: i32, offset: i64, lsn: u64, seq: u64) -> Item {
        Item {
            msg: msg(partition, offset, None),
            decoded: Ok(Decoded::Change(change(Op::Update, lsn, seq, false))),
        }
    }

    #[test]
    fn a_shape_barrier_is_read_from_its_headers_and_sits_just_before_its_change() {
        let b = shape_barrier(0, 0, 200, 3, 2);
        let w = b.barrier().expect("a barrier");
        assert_eq!(b.watermark(), Some(w), "applying it stores its position");
        assert!(w < Watermark::of(&change(Op::Update, 200, 3, false)));
        assert!(w > Watermark::of(&change(Op::Update, 200, 2, false)));
        assert!(w > Watermark::of(&change(Op::Update, 199, 9, false)));
        // A tombstone of no key without the header is no barrier.
        let plain = Item {
            msg: msg(0, 1, None),
            decoded: Ok(Decoded::Tombstone(None)),
        };
        assert_eq!(plain.barrier(), None);
    }

    #[test]
    fn any_arrival_order_applies_every_old_shape_event_before_any_new_one() {
        // Each of three partitions: two events of the old column types, the shape barrier,
        // one event of the new types (the change at lsn 200 is the first of the new shape).
        let records: Vec<Vec<Item>> = (0..3)
            .map(|p| {
                vec![
                    streamed(p, 0, 100, p as u64),
                    streamed(p, 1, 150, p as u64),
                    shape_barrier(p, 2, 200, 0, 3),
                    streamed(p, 3, 200, p as u64),
                ]
            })
            .collect();
        for order in interleavings(&[4, 4, 4]) {
            let mut next = [0usize; 3];
            let mut b = PartitionBarrier::default();
            let mut applied = HashMap::new();
            let mut flat: Vec<(i32, i64)> = Vec::new();
            for p in &order {
                let item = clone_item(&records[*p][next[*p]]);
                next[*p] += 1;
                let r = b.route(vec![item], &applied, &parts(3));
                apply(&mut applied, &r.ready);
                flat.extend(offsets(&r.ready));
            }
            assert_eq!(flat.len(), 12, "everything released: {order:?}");
            let last_old = flat.iter().rposition(|(_, o)| *o < 2).unwrap_or(0);
            let first_new = flat.iter().position(|(_, o)| *o == 3).unwrap_or(0);
            assert!(
                last_old < first_new,
                "an event of the new types before one of the old: {order:?} gave {flat:?}"
            );
        }
    }

    #[test]
    fn a_shape_barrier_written_again_after_a_restart_does_not_hold_what_applied_it() {
        // Partition 0 applied the barrier before a restart; the source, restarted, wrote it
        // again to both partitions (its new schema was not registered yet).
        let mut applied = HashMap::new();
        let first = shape_barrier(0, 2, 200, 0, 2);
        apply(&mut applied, std::slice::from_ref(&first));
        let mut b = PartitionBarrier::default();
        let r = b.route(
            vec![shape_barrier(0, 3, 200, 0, 2), streamed(0, 4, 200, 1)],
            &applied,
            &parts(2),
        );
        assert_eq!(offsets(&r.ready), vec![(0, 3), (0, 4)], "passed again");
        // Partition 1 meets only the copy: partition 0 is past it, so it is not held either.
        let r = b.route(
            vec![shape_barrier(1, 7, 200, 0, 2), streamed(1, 8, 200, 2)],
            &applied,
            &parts(2),
        );
        assert_eq!(offsets(&r.ready), vec![(1, 7), (1, 8)]);
        assert_eq!(b.held().count(), 0);
    }

    #[test]
    fn a_shape_barrier_and_a_truncate_at_one_position_are_two_barriers_in_order() {
        // A table read again right after its types changed: the barrier, then the truncate
        // opening its snapshot, at the same commit position, on both partitions.
        let mut b = PartitionBarrier::default();
        let mut applied = HashMap::new();
        let mut flat = Vec::new();
        let before_snapshot = |p| barrier_before(p, 0, 200, 0, 2, "snapshot");
        assert!(
            before_snapshot(0).barrier() < truncate(0, 1, 200, Some(2)).barrier(),
            "the barrier comes first"
        );
        for batch in [
            vec![before_snapshot(0), truncate(0, 1, 200, Some(2))],
            vec![row(0, 2, 200, 1), before_snapshot(1)],
            vec![truncate(1, 1, 200, Some(2)), row(1, 2, 200, 2)],
        ] {
            let r = b.route(batch, &applied, &parts(2));
            apply(&mut applied, &r.ready);
            flat.extend(offsets(&r.ready));
        }
        assert_eq!(flat, vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]);
    }

    fn clone_item(i: &Item) -> Item {
        Item {
            msg: i.msg.clone(),
            decoded: match &i.decoded {
                Ok(Decoded::Change(c)) => Ok(Decoded::Change(c.clone())),
                _ => Ok(Decoded::Tombstone(None)),
            },
        }
    }

    /// Every sequence of partition indexes taking `counts[p]` items from each partition.
    fn interleavings(counts: &[usize]) -> Vec<Vec<usize>> {
        if counts.iter().all(|c| *c == 0) {
            return vec![Vec::new()];
        }
        let mut all = Vec::new();
        for p in 0..counts.len() {
            if counts[p] == 0 {
                continue;
            }
            let mut rest = counts.to_vec();
            rest[p] -= 1;
            for mut tail in interleavings(&rest) {
                tail.insert(0, p);
                all.push(tail);
            }
        }
        all
    }
}
