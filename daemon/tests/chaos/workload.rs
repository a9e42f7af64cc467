//! The workload: transactions drawn from a seed, committed one after another on the source,
//! each recorded in the [`History`] once it committed.
//!
//! ```text
//!  Workload::draw ──(sql, effects)──► source db ──committed?──► History::record(tx number, ...)
//!        ▲                                │ answer lost (PostgreSQL restarted under it)
//!        └── History::live (keys to pick) └──► settled by looking for the txlog row
//! ```

use crate::check::{Effect, History, Key};
use crate::connect_retrying;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// SplitMix64: a small, well-mixed generator, so a printed seed replays a run exactly.
#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

pub(crate) const DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE acct (id bigint PRIMARY KEY, v bigint NOT NULL, m mood NOT NULL, note text);
CREATE TABLE line (o int, n int, v bigint NOT NULL, qty int, PRIMARY KEY (o, n));
CREATE TABLE doc (id int PRIMARY KEY, v bigint NOT NULL, title text, body text);
CREATE TABLE txlog (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
";

/// A big value TOAST keeps out of line (hex digits that pglz cannot shrink below the limit).
pub(crate) const BIG_BODY: &str =
    "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))";

/// A committed-or-not transaction: SQL and its effects, tagged with its txlog id.
struct Tx {
    id: u64,
    sql: String,
    effects: Vec<Effect>,
}

/// Draws the next transaction of the workload.
pub(crate) struct Workload {
    pub(crate) rng: Rng,
    pub(crate) next_v: i64,
    pub(crate) next_id: i64,
    pub(crate) next_line: i64,
    /// The last txlog id drawn.
    pub(crate) tx: u64,
    pub(crate) add_column_at: u64,
    pub(crate) large_at: u64,
    pub(crate) large_rows: i64,
    pub(crate) column_added: bool,
}

impl Workload {
    fn v(&mut self) -> i64 {
        self.next_v += 1;
        self.next_v
    }

    fn draw(&mut self, h: &History) -> Tx {
        self.tx += 1;
        let id = self.tx;
        let mut sql = String::from("BEGIN;\n");
        let mut effects = Vec::new();
        let mut touched: HashSet<Key> = HashSet::new();
        if id == self.add_column_at && !self.column_added {
            self.column_added = true;
            sql.push_str("ALTER TABLE acct ADD COLUMN extra text;\n");
        }
        if id == self.large_at {
            let v0 = self.next_v + 1;
            self.next_v += self.large_rows;
            sql.push_str(&format!(
                "INSERT INTO line SELECT 1000000 + g / 100, g % 100, {v0} + g, g % 7 FROM generate_series(0, {}) g;\n",
                self.large_rows - 1
            ));
            for g in 0..self.large_rows {
                effects.push(Effect::Put(
                    1,
                    format!("{},{}", 1_000_000 + g / 100, g % 100),
                    v0 + g,
                ));
            }
        } else if self.rng.chance(0.004) {
            sql.push_str("TRUNCATE line;\n");
            effects.push(Effect::Truncate(1));
        } else {
            let ops = if self.rng.chance(0.05) {
                20 + self.rng.below(200)
            } else {
                1 + self.rng.below(6)
            };
            for _ in 0..ops {
                self.op(h, &mut sql, &mut effects, &mut touched);
            }
        }
        sql.push_str(&format!("INSERT INTO txlog (id) VALUES ({id});\nCOMMIT;"));
        effects.push(Effect::Put(3, id.to_string(), 0));
        Tx { id, sql, effects }
    }

    fn pick(&mut self, h: &History, t: usize, touched: &HashSet<Key>) -> Option<String> {
        let live = &h.live[t];
        if live.is_empty() {
            return None;
        }
        let k = live[self.rng.below(live.len() as u64) as usize].clone();
        (!touched.contains(&(t, k.clone()))).then_some(k)
    }

    fn op(
        &mut self,
        h: &History,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        let moods = ["sad", "ok", "happy"];
        let roll = self.rng.below(100);
        let extra = if self.column_added {
            ", extra = 'e' || v"
        } else {
            ""
        };
        match roll {
            // acct: insert, update, delete, key change with a re-insert of the old key.
            0..=19 => {
                self.next_id += 1;
                let (id, v) = (self.next_id, self.v());
                let m = moods[self.rng.below(3) as usize];
                sql.push_str(&format!(
                    "INSERT INTO acct (id, v, m, note) VALUES ({id}, {v}, '{m}', 'n{v}');\n"
                ));
                touched.insert((0, id.to_string()));
                effects.push(Effect::Put(0, id.to_string(), v));
            }
            20..=39 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    let v = self.v();
                    let m = moods[self.rng.below(3) as usize];
                    sql.push_str(&format!(
                        "UPDATE acct SET v = {v}, m = '{m}'{extra} WHERE id = {k};\n"
                    ));
                    touched.insert((0, k.clone()));
                    effects.push(Effect::Put(0, k, v));
                }
            }
            40..=46 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    sql.push_str(&format!("DELETE FROM acct WHERE id = {k};\n"));
                    touched.insert((0, k.clone()));
                    effects.push(Effect::Delete(0, k));
                }
            }
            47..=51 => {
                if let Some(k) = self.pick(h, 0, touched) {
                    self.next_id += 1;
                    let (new, v, v2) = (self.next_id, self.v(), self.v());
                    sql.push_str(&format!(
                        "UPDATE acct SET id = {new}, v = {v} WHERE id = {k};\nINSERT INTO acct (id, v, m) VALUES ({k}, {v2}, 'ok');\n"
                    ));
                    touched.insert((0, k.clone()));
                    touched.insert((0, new.to_string()));
                    effects.push(Effect::Delete(0, k.clone()));
                    effects.push(Effect::Put(0, new.to_string(), v));
                    effects.push(Effect::Put(0, k, v2));
                }
            }
            // line (composite key): insert, update, delete.
            52..=66 => {
                self.next_line += 1;
                let (o, n) = (self.next_line / 10, self.next_line % 10);
                let v = self.v();
                sql.push_str(&format!(
                    "INSERT INTO line VALUES ({o}, {n}, {v}, {});\n",
                    v % 13
                ));
                let k = format!("{o},{n}");
                touched.insert((1, k.clone()));
                effects.push(Effect::Put(1, k, v));
            }
            67..=76 => {
                if let Some(k) = self.pick(h, 1, touched) {
                    let v = self.v();
                    let (o, n) = k.split_once(',').unwrap_or(("0", "0"));
                    sql.push_str(&format!(
                        "UPDATE line SET v = {v}, qty = qty + 1 WHERE o = {o} AND n = {n};\n"
                    ));
                    touched.insert((1, k.clone()));
                    effects.push(Effect::Put(1, k, v));
                }
            }
            77..=80 => {
                if let Some(k) = self.pick(h, 1, touched) {
                    let (o, n) = k.split_once(',').unwrap_or(("0", "0"));
                    sql.push_str(&format!("DELETE FROM line WHERE o = {o} AND n = {n};\n"));
                    touched.insert((1, k.clone()));
                    effects.push(Effect::Delete(1, k));
                }
            }
            // doc: inserts with a TOASTed body; most updates leave the body alone.
            81..=85 => {
                self.next_id += 1;
                let (id, v) = (self.next_id, self.v());
                sql.push_str(&format!(
                    "INSERT INTO doc VALUES ({id}, {v}, 't{v}', {BIG_BODY});\n"
                ));
                touched.insert((2, id.to_string()));
                effects.push(Effect::Put(2, id.to_string(), v));
            }
            86..=96 => {
                if let Some(k) = self.pick(h, 2, touched) {
                    let v = self.v();
                    let body = if self.rng.chance(0.1) {
                        format!(", body = {BIG_BODY}")
                    } else {
                        String::new()
                    };
                    sql.push_str(&format!(
                        "UPDATE doc SET v = {v}, title = 't{v}'{body} WHERE id = {k};\n"
                    ));
                    touched.insert((2, k.clone()));
                    effects.push(Effect::Put(2, k, v));
                }
            }
            _ => {
                if let Some(k) = self.pick(h, 2, touched) {
                    sql.push_str(&format!("DELETE FROM doc WHERE id = {k};\n"));
                    touched.insert((2, k.clone()));
                    effects.push(Effect::Delete(2, k));
                }
            }
        }
    }
}

/// Runs the workload until `stop`, recording what committed. A commit whose answer was lost
/// (PostgreSQL restarted under it) is settled by looking for its txlog row.
pub(crate) fn start_workload(
    db: String,
    mut w: Workload,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = connect_retrying(&db).await;
        while !*stop.borrow() {
            let tx = {
                let h = history.lock().unwrap_or_else(|p| p.into_inner());
                w.draw(&h)
            };
            let committed = match c.batch_execute(&tx.sql).await {
                Ok(()) => true,
                Err(_) => {
                    c = connect_retrying(&db).await;
                    let found = c
                        .query_opt("SELECT 1 FROM txlog WHERE id = $1", &[&(tx.id as i64)])
                        .await
                        .ok()
                        .flatten()
                        .is_some();
                    history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .indeterminate += 1;
                    found
                }
            };
            if committed {
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                // Numbered in commit order: the workload commits one transaction at a time.
                h.committed_tx += 1;
                let n = h.committed_tx;
                h.record(n, &tx.effects);
                if tx.effects.len() > 10_000 {
                    h.large_committed = true;
                }
            } else if tx.sql.contains("ADD COLUMN") {
                w.column_added = false;
                w.add_column_at = w.tx + 1;
            } else if tx.effects.len() > 10_000 {
                w.large_at = w.tx + 1;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    })
}
