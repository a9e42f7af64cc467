//! The workload: transactions drawn from a seed, committed one after another on the source,
//! each recorded in the [`History`] once it committed.
//!
//! ```text
//!  Workload::draw ──(sql, effects, shape)──► source db ──committed?──► History::record(tx number, ...)
//!    ▲     ▲                                     │                 └──► Workload::shape = its shape
//!    │     └── Workload::shape (DDL committed)   │ answer lost (PostgreSQL restarted under it)
//!    └── History::live (keys to pick)            └──► settled by looking for the txlog row
//! ```
//!
//! Seven DDL changes come at transactions drawn from the seed, each in its own order:
//! `acct` gets column `extra` (with a default for half the seeds, which the daemon answers by
//! reading `acct` again), `line.qty` is renamed `quantity`, and that column (under
//! whichever name it has then) becomes `bigint`, after which some writes put values above 2^31
//! into it; table `late` is created (with its first rows, in the same transaction), and table
//! `gone` is dropped (after a last change of it, in the same transaction), and `doc.title` is
//! dropped (the target keeps it: `on_column_drop = "keep"`), and `doc.code` goes from text
//! (`c<v>`) to `bigint` by an expression, which the registry refuses and the target cannot
//! follow by a cast: the run's operator lets the subject take it and runs the expression on
//! the target, as the daemon's messages say. The writes of a
//! transaction after its DDL use the new shape; the workload's [`Shape`] follows only DDL that
//! committed (a transaction that did not commit has its DDL done again by the next one). Each
//! change of `line` is followed in its transaction by an insert into `line`, so that an event
//! of the new shape reaches Kafka with it.
//!
//! `late` and `gone` (`id`, `v`) take inserts, updates and deletes while they exist. The daemon
//! finds `late` by its catalog check and reads it (its rows until then reach Kafka as rows of
//! that read); `gone` it finds gone and announces the drop on its topic. `gone` is not dropped
//! while a slot drop's window is open ([`Workload::drop_lock`]): the new snapshot could not
//! read it any more, and its changes the old slot had not streamed would be lost for good.
//!
//! About one transaction in twenty is large (20–220 writes, some with TOASTed bodies); a third
//! of those first write and roll back a savepoint. The daemon runs with
//! `stream_large_transactions` and a `logical_decoding_work_mem` of 64kB, so PostgreSQL streams
//! these while they run, rolled-back savepoints included.

use crate::check::{Effect, History, Key, GONE, LATE, TABLES};
use crate::connect_retrying;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

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

/// How `doc.code` becomes `bigint`: by an expression a plain cast cannot repeat.
pub(crate) const RETYPE_CODE: &str =
    "ALTER TABLE doc ALTER COLUMN code TYPE bigint USING substr(code, 2)::bigint;";

pub(crate) const DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE acct (id bigint PRIMARY KEY, v bigint NOT NULL, m mood NOT NULL, note text);
CREATE TABLE line (o int, n int, v bigint NOT NULL, qty int, PRIMARY KEY (o, n));
CREATE TABLE doc (id int PRIMARY KEY, v bigint NOT NULL, title text, body text, code text);
CREATE TABLE txlog (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE gone (id bigint PRIMARY KEY, v bigint NOT NULL);
";

/// A big value TOAST keeps out of line (hex digits that pglz cannot shrink below the limit).
pub(crate) const BIG_BODY: &str =
    "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))";

/// A value of `line`'s quantity column above 2^31, once it is `bigint`.
const BIG_QTY: i64 = 3_000_000_000;

/// The source tables' shape as the workload's SQL must see it: what the DDL changes that
/// committed made of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    /// `acct` has column `extra`.
    pub(crate) extra: bool,
    /// `line.qty` is named `quantity`.
    pub(crate) renamed: bool,
    /// `line`'s quantity column is `bigint` (it was `int`).
    pub(crate) bigint: bool,
    /// Table `late` exists.
    pub(crate) late: bool,
    /// Table `gone` was dropped.
    pub(crate) gone_dropped: bool,
    /// `doc.title` was dropped (the target keeps it, with its values: `on_column_drop = "keep"`).
    pub(crate) title_dropped: bool,
    /// `doc.code` is `bigint`: it was text (`c<v>`), changed `USING substr(code, 2)::bigint`,
    /// which neither the registry's rule nor the target's cast takes without the operator.
    pub(crate) code_bigint: bool,
}

impl Shape {
    /// The SQL value of `doc.code` written with version `v`.
    pub(crate) fn code(&self, v: i64) -> String {
        if self.code_bigint {
            v.to_string()
        } else {
            format!("'c{v}'")
        }
    }

    /// The current name of `line`'s quantity column.
    pub(crate) fn qty(&self) -> &'static str {
        if self.renamed {
            "quantity"
        } else {
            "qty"
        }
    }

    /// `line`'s columns as `name type` (`format_type`), in column order.
    pub(crate) fn line_columns(&self) -> Vec<String> {
        let ty = if self.bigint { "bigint" } else { "integer" };
        vec![
            "o integer".to_string(),
            "n integer".to_string(),
            "v bigint".to_string(),
            format!("{} {ty}", self.qty()),
        ]
    }
}

/// A committed-or-not transaction: SQL and its effects, tagged with its txlog id, and the
/// shape of the tables once it committed.
struct Tx {
    id: u64,
    sql: String,
    effects: Vec<Effect>,
    shape: Shape,
}

/// Draws the next transaction of the workload.
pub(crate) struct Workload {
    pub(crate) rng: Rng,
    pub(crate) next_v: i64,
    pub(crate) next_id: i64,
    pub(crate) next_line: i64,
    /// The last txlog id drawn.
    pub(crate) tx: u64,
    /// The txlog ids from which on `acct` gets column `extra`, `line.qty` is renamed
    /// `quantity`, and that column becomes `bigint`: each done by the first transaction from
    /// there on that commits.
    pub(crate) add_column_at: u64,
    pub(crate) rename_at: u64,
    pub(crate) retype_at: u64,
    /// The txlog ids from which on `late` is created and `gone` dropped, each by the first
    /// transaction from there on that commits (the drop: that also holds [`Self::drop_lock`]).
    pub(crate) create_at: u64,
    pub(crate) drop_at: u64,
    /// The txlog id from which on `doc.title` is dropped.
    pub(crate) drop_column_at: u64,
    /// The txlog id from which on `doc.code` becomes `bigint`.
    pub(crate) retype_code_at: u64,
    pub(crate) large_at: u64,
    pub(crate) large_rows: i64,
    /// The shape the committed transactions left.
    pub(crate) shape: Shape,
    /// `extra` is added with a default: every existing row gets a value without a row change
    /// in the WAL, so the daemon reads `acct` again (a resync, which empties and refills it).
    pub(crate) extra_default: bool,
    /// That resync's progress, for the sampler and the run: [`REWRITE_ISSUED`] once the DDL
    /// is sent, [`REWRITE_COMMITTED`] once it committed, [`REWRITE_SETTLED`] once the run saw
    /// the target refilled.
    pub(crate) rewrite: Arc<AtomicU8>,
    /// `late`'s progress, for the sampler and the run: [`LATE_ISSUED`] once its CREATE is
    /// sent, [`LATE_CREATED`] once it committed, [`LATE_READ`] once the run saw the daemon's
    /// read of it on Kafka and applied to the target. The sampler looks at `late` from then on
    /// only: its read empties and fills it (again, when interrupted).
    pub(crate) late: Arc<AtomicU8>,
    /// Held by an open slot-drop window (see `faults::drop_slot`); the transaction that drops
    /// `gone` holds it until it is settled, and is put off while a window holds it.
    pub(crate) drop_lock: Arc<tokio::sync::Mutex<()>>,
}

pub(crate) const REWRITE_ISSUED: u8 = 1;
pub(crate) const REWRITE_COMMITTED: u8 = 2;
pub(crate) const REWRITE_SETTLED: u8 = 3;

pub(crate) const LATE_ISSUED: u8 = 1;
pub(crate) const LATE_CREATED: u8 = 2;
pub(crate) const LATE_READ: u8 = 3;

impl Workload {
    fn v(&mut self) -> i64 {
        self.next_v += 1;
        self.next_v
    }

    /// Whether the next transaction is due to drop `gone` (it needs [`Self::drop_lock`]).
    fn drop_due(&self) -> bool {
        self.tx + 1 >= self.drop_at && !self.shape.gone_dropped
    }

    /// The next transaction; `may_drop`: it holds [`Self::drop_lock`], so it may drop `gone`.
    fn draw(&mut self, h: &History, may_drop: bool) -> Tx {
        self.tx += 1;
        let id = self.tx;
        let mut sql = String::from("BEGIN;\n");
        let mut effects = Vec::new();
        let mut touched: HashSet<Key> = HashSet::new();
        let shape = self.alter(h, id, may_drop, &mut sql, &mut effects, &mut touched);
        if id == self.large_at {
            let v0 = self.next_v + 1;
            self.next_v += self.large_rows;
            sql.push_str(&format!(
                "INSERT INTO line (o, n, v, {q}) SELECT 1000000 + g / 100, g % 100, {v0} + g, g % 7 FROM generate_series(0, {}) g;\n",
                self.large_rows - 1,
                q = shape.qty()
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
            // Some large transactions roll back a savepoint's worth of writes first: with the
            // source streaming transactions over 64kB, that is a streamed subtransaction abort.
            if ops >= 20 && self.rng.chance(0.3) {
                sql.push_str("SAVEPOINT undone;\n");
                let (mut undone, mut undone_touched) = (Vec::new(), touched.clone());
                for _ in 0..ops / 2 {
                    self.op(h, shape, &mut sql, &mut undone, &mut undone_touched);
                }
                sql.push_str("ROLLBACK TO SAVEPOINT undone;\n");
            }
            for _ in 0..ops {
                self.op(h, shape, &mut sql, &mut effects, &mut touched);
            }
        }
        sql.push_str(&format!("INSERT INTO txlog (id) VALUES ({id});\nCOMMIT;"));
        effects.push(Effect::Put(3, id.to_string(), 0));
        Tx {
            id,
            sql,
            effects,
            shape,
        }
    }

    /// The DDL due at transaction `id` that has not committed yet, and the shape the
    /// transaction's writes see after it. A change of `line` is followed by an insert of the
    /// new shape (after the type change, of a value above 2^31). `late` gets rows in the
    /// transaction that creates it; `gone` a last update in the one that drops it, which only
    /// a transaction holding the drop lock does (`may_drop`).
    fn alter(
        &mut self,
        h: &History,
        id: u64,
        may_drop: bool,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) -> Shape {
        let mut shape = self.shape;
        if id >= self.add_column_at && !shape.extra {
            shape.extra = true;
            if self.extra_default {
                // The sampler pauses before the table can be emptied.
                let _ = self.rewrite.compare_exchange(
                    0,
                    REWRITE_ISSUED,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                sql.push_str("ALTER TABLE acct ADD COLUMN extra text DEFAULT 'filled';\n");
            } else {
                sql.push_str("ALTER TABLE acct ADD COLUMN extra text;\n");
            }
        }
        if id >= self.rename_at && !shape.renamed {
            shape.renamed = true;
            sql.push_str("ALTER TABLE line RENAME COLUMN qty TO quantity;\n");
            self.insert_line(shape, false, sql, effects, touched);
        }
        if id >= self.retype_at && !shape.bigint {
            sql.push_str(&format!(
                "ALTER TABLE line ALTER COLUMN {} TYPE bigint;\n",
                shape.qty()
            ));
            shape.bigint = true;
            self.insert_line(shape, true, sql, effects, touched);
        }
        if id >= self.drop_column_at && !shape.title_dropped {
            shape.title_dropped = true;
            sql.push_str("ALTER TABLE doc DROP COLUMN title;\n");
        }
        if id >= self.retype_code_at && !shape.code_bigint {
            // The registry refuses the new schema (string → long breaks BACKWARD) and the
            // target cannot cast `c<v>`: the run's operator (see `operator.rs`) fixes both.
            shape.code_bigint = true;
            sql.push_str(RETYPE_CODE);
            sql.push('\n');
        }
        if id >= self.create_at && !shape.late {
            shape.late = true;
            // The sampler leaves `late` alone until the run saw its read applied.
            let _ = self
                .late
                .compare_exchange(0, LATE_ISSUED, Ordering::SeqCst, Ordering::SeqCst);
            sql.push_str("CREATE TABLE late (id bigint PRIMARY KEY, v bigint NOT NULL);\n");
            // Rows from before the daemon knows the table: they reach Kafka with its read.
            for _ in 0..3 {
                self.insert_kv(LATE, sql, effects, touched);
            }
        }
        if may_drop && id >= self.drop_at && !shape.gone_dropped {
            // A change in the dropping transaction itself: the drop's announcement must follow
            // it too, and the target keep it.
            if let Some(k) = self.pick(h, GONE, touched) {
                self.update_kv(GONE, k, sql, effects, touched);
            }
            shape.gone_dropped = true;
            sql.push_str("DROP TABLE gone;\n");
        }
        shape
    }

    /// Inserts a new row into `late` or `gone`.
    fn insert_kv(
        &mut self,
        t: usize,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        self.next_id += 1;
        let (id, v) = (self.next_id, self.v());
        sql.push_str(&format!(
            "INSERT INTO {} (id, v) VALUES ({id}, {v});\n",
            TABLES[t].0
        ));
        touched.insert((t, id.to_string()));
        effects.push(Effect::Put(t, id.to_string(), v));
    }

    /// Gives row `k` of `late` or `gone` a new version.
    fn update_kv(
        &mut self,
        t: usize,
        k: String,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        let v = self.v();
        sql.push_str(&format!(
            "UPDATE {} SET v = {v} WHERE id = {k};\n",
            TABLES[t].0
        ));
        touched.insert((t, k.clone()));
        effects.push(Effect::Put(t, k, v));
    }

    /// A write to `late` or `gone`: an insert, an update or a delete.
    fn op_kv(
        &mut self,
        h: &History,
        t: usize,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        match self.rng.below(100) {
            0..=44 => self.insert_kv(t, sql, effects, touched),
            45..=84 => {
                if let Some(k) = self.pick(h, t, touched) {
                    self.update_kv(t, k, sql, effects, touched);
                }
            }
            _ => {
                if let Some(k) = self.pick(h, t, touched) {
                    sql.push_str(&format!("DELETE FROM {} WHERE id = {k};\n", TABLES[t].0));
                    touched.insert((t, k.clone()));
                    effects.push(Effect::Delete(t, k));
                }
            }
        }
    }

    /// Inserts a new row into `line`; `big`: with a quantity above 2^31 (`bigint` only).
    fn insert_line(
        &mut self,
        shape: Shape,
        big: bool,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        self.next_line += 1;
        let (o, n) = (self.next_line / 10, self.next_line % 10);
        let v = self.v();
        let qty = if big && shape.bigint {
            BIG_QTY + v
        } else {
            v % 13
        };
        sql.push_str(&format!(
            "INSERT INTO line (o, n, v, {q}) VALUES ({o}, {n}, {v}, {qty});\n",
            q = shape.qty()
        ));
        let k = format!("{o},{n}");
        touched.insert((1, k.clone()));
        effects.push(Effect::Put(1, k, v));
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
        shape: Shape,
        sql: &mut String,
        effects: &mut Vec<Effect>,
        touched: &mut HashSet<Key>,
    ) {
        // One write in eight goes to `late` or `gone`, while they exist.
        let kv: Vec<usize> = [(LATE, shape.late), (GONE, !shape.gone_dropped)]
            .into_iter()
            .filter_map(|(t, exists)| exists.then_some(t))
            .collect();
        if !kv.is_empty() && self.rng.chance(0.125) {
            let t = kv[self.rng.below(kv.len() as u64) as usize];
            self.op_kv(h, t, sql, effects, touched);
            return;
        }
        let moods = ["sad", "ok", "happy"];
        let roll = self.rng.below(100);
        let q = shape.qty();
        let extra = if shape.extra {
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
            // line (composite key): insert, update, delete; once the quantity column is
            // bigint, some inserts and updates put values above 2^31 into it.
            52..=66 => {
                let big = shape.bigint && self.rng.chance(0.2);
                self.insert_line(shape, big, sql, effects, touched);
            }
            67..=76 => {
                if let Some(k) = self.pick(h, 1, touched) {
                    let v = self.v();
                    let (o, n) = k.split_once(',').unwrap_or(("0", "0"));
                    let qty = if shape.bigint && self.rng.chance(0.2) {
                        (BIG_QTY + v).to_string()
                    } else {
                        format!("{q} + 1")
                    };
                    sql.push_str(&format!(
                        "UPDATE line SET v = {v}, {q} = {qty} WHERE o = {o} AND n = {n};\n"
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
                let code = shape.code(v);
                sql.push_str(&if shape.title_dropped {
                    format!("INSERT INTO doc (id, v, body, code) VALUES ({id}, {v}, {BIG_BODY}, {code});\n")
                } else {
                    format!("INSERT INTO doc (id, v, title, body, code) VALUES ({id}, {v}, 't{v}', {BIG_BODY}, {code});\n")
                });
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
                    let title = if shape.title_dropped {
                        String::new()
                    } else {
                        format!(", title = 't{v}'")
                    };
                    sql.push_str(&format!(
                        "UPDATE doc SET v = {v}, code = {}{title}{body} WHERE id = {k};\n",
                        shape.code(v)
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

/// An error of the SQL itself (a wrong column name, a value its column cannot hold): the
/// workload drew it wrong, and drawn again it would fail again.
fn sql_is_wrong(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code().get(..2), Some("22" | "42")))
}

/// Whether transaction `id`, whose answer was lost, committed: its txlog row, written in the
/// same transaction, says so. Asked again until PostgreSQL answers: a failed look-up taken for
/// "not committed" would lose a committed transaction's effects, or do its DDL once more.
/// Returns the session it asked on.
async fn settle(db: &str, id: u64) -> (Client, bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = connect_retrying(db).await;
        match c
            .query_opt("SELECT 1 FROM txlog WHERE id = $1", &[&(id as i64)])
            .await
        {
            Ok(row) => return (c, row.is_some()),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "transaction {id}: its txlog row could not be looked up within 120 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Runs the workload until `stop`, recording what committed, and returns it (its shape is the
/// source's then). A commit whose answer was lost (PostgreSQL restarted under it) is settled by
/// looking for its txlog row; the DDL of a transaction that did not commit is done again by the
/// next one.
pub(crate) fn start_workload(
    db: String,
    mut w: Workload,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Workload> {
    tokio::spawn(async move {
        let mut c = connect_retrying(&db).await;
        while !*stop.borrow() {
            // The drop of `gone` waits while a slot-drop window is open (the lock is held until
            // this transaction is settled); the transactions meanwhile go on without it.
            let drop_guard = if w.drop_due() {
                w.drop_lock.clone().try_lock_owned().ok()
            } else {
                None
            };
            let tx = {
                let h = history.lock().unwrap_or_else(|p| p.into_inner());
                w.draw(&h, drop_guard.is_some())
            };
            let committed = match c.batch_execute(&tx.sql).await {
                Ok(()) => true,
                Err(e) => {
                    assert!(
                        !sql_is_wrong(&e),
                        "transaction {}: the workload's SQL is wrong: {e}\n{}",
                        tx.id,
                        tx.sql
                    );
                    history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .indeterminate += 1;
                    let (fresh, found) = settle(&db, tx.id).await;
                    c = fresh;
                    found
                }
            };
            if committed {
                if tx.shape.extra && !w.shape.extra && w.extra_default {
                    w.rewrite.store(REWRITE_COMMITTED, Ordering::SeqCst);
                }
                let created = tx.shape.late && !w.shape.late;
                let dropped = tx.shape.gone_dropped && !w.shape.gone_dropped;
                w.shape = tx.shape;
                let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                // Numbered in commit order: the workload commits one transaction at a time.
                h.committed_tx += 1;
                let n = h.committed_tx;
                h.record(n, &tx.effects);
                if tx.effects.len() > 10_000 {
                    h.large_committed = true;
                }
                if created {
                    h.late_created = Some(n);
                    // Under the history's lock: whoever sees LATE_CREATED finds the number.
                    w.late.store(LATE_CREATED, Ordering::SeqCst);
                }
                if dropped {
                    h.gone_dropped = Some(n);
                }
            } else if tx.effects.len() > 10_000 {
                w.large_at = w.tx + 1;
            }
            drop(drop_guard);
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        w
    })
}
