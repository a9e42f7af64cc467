//! The type matrix: a table per type family with edge values, cloned through the real stack
//! and compared value by value (each row's text form) and column type by column type
//! (docs/types.md).

mod common;

use common::clone::{wait_equal, Clone};
use common::*;
use std::time::Duration;

/// Types the events need in the target, as in the source.
const SHARED_TYPES: &str = "
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with '' quote');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE DOMAIN money2 AS numeric(12,2);
CREATE TYPE pair AS (a integer, b text);
";

const SOURCE: &str = "
CREATE TABLE numbers (
    id int PRIMARY KEY, n numeric, n102 numeric(10,2), n5m2 numeric(5,-2), m money,
    r real, d double precision, s smallint, i integer, b bigint
);
INSERT INTO numbers VALUES
 (1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
 (2, '-0.000000000000000000001', -0.01, -12300, '-$0.01', '-0', '-0', -32768, -2147483648, -9223372036854775808),
 (3, '123456789012345678901234567890.123456789', 12345678.91, 99900, '$92,233,720,368,547,758.07', 3.4028235e38, 1.7976931348623157e308, 32767, 2147483647, 9223372036854775807),
 (4, 'NaN', 'NaN', NULL, NULL, 'NaN', 'NaN', NULL, NULL, NULL),
 (5, 'Infinity', NULL, NULL, NULL, 'Infinity', 'Infinity', NULL, NULL, NULL),
 (6, '-Infinity', NULL, NULL, NULL, '-Infinity', '-Infinity', NULL, NULL, NULL),
 (7, NULL, NULL, NULL, NULL, 1.17549435e-38, 5e-324, NULL, NULL, NULL),
 (8, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE texts (id int PRIMARY KEY, t text, v varchar(5), c char(4), nm name, ch \"char\", ci citext, b bytea);
INSERT INTO texts VALUES
 (1, '', '', '', '', 'a', '', ''),
 (2, E'tab\\there\\nnew line\\r\\\\ back \"quote\" ''single''', 'abcde', 'ab', 'n', 'z', 'MiXeD', '\\x00ff'),
 (3, E'\\u00e9\\u4e2d\\U0001F600 \\u200b zero-width, \\uFEFF bom', E'\\U0001F600', E'\\u00e9', E'\\u4e2d', '~', E'\\u00c9t\\u00e9', NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
UPDATE texts SET b = (SELECT decode(string_agg(lpad(to_hex(g), 2, '0'), ''), 'hex') FROM generate_series(0, 255) g) WHERE id = 4;

CREATE TABLE times (id int PRIMARY KEY, d date, t time, tz timetz, ts timestamp, tstz timestamptz, iv interval);
INSERT INTO times VALUES
 (1, 'infinity', '24:00:00', '12:00:00+14', 'infinity', 'infinity', '1 year 2 mons -3 days 04:05:06.789'),
 (2, '-infinity', '00:00:00.000001', '00:00:00-12', '-infinity', '-infinity', '-178000000 years'),
 (3, '4713-01-01 BC', '23:59:59.999999', '23:59:59.999999+05:30', '4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC', '0'),
 (4, '10000-01-01', '12:34:56', '12:34:56-03:30', '10000-01-01 00:00:00.000001', '10000-12-31 23:59:59.999999+00', '1 microsecond'),
 (5, '2000-02-29', NULL, NULL, '1999-12-31 23:59:59.5', '2024-03-10 02:30:00-05', NULL),
 (6, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE networks (id int PRIMARY KEY, ip inet, net cidr, mac macaddr, mac8 macaddr8, b bit(3), vb varbit);
INSERT INTO networks VALUES
 (1, '::1', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'101', ''),
 (2, '192.168.0.1/24', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00', B'000', B'1'),
 (3, '0.0.0.0', '0.0.0.0/0', NULL, NULL, NULL, B'10101010101010101010101010101010101'),
 (4, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE docs (id int PRIMARY KEY, tv tsvector, tq tsquery, x xml, j json, jb jsonb, h hstore);
INSERT INTO docs VALUES
 (1, 'a fat cat sat on a mat', 'fat & (rat | cat)', '<a b=\"1\">text &amp; more</a>', '{\"a\": [1, 2.50, null], \"b\": \"\\u00e9\"}', '{\"b\": 1, \"a\": [true, null]}', 'a=>1, \"b c\"=>NULL'),
 (2, '', '!x', '<!-- only a comment -->', '[]', '\"just a string\"', ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE shapes (id int PRIMARY KEY, p point, l line, s lseg, b box, pa path, po polygon, c circle);
INSERT INTO shapes VALUES
 (1, '(1,2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),1.5>'),
 (2, '(-1.5e300,1e-300)', '{0,1,-2}', '[(1,2),(3,4)]', '(0,0),(0,0)', '((0,0),(1,1))', '((0,0))', '<(1,1),0>'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE ranges (id int PRIMARY KEY, i int4range, b int8range, n numrange, d daterange, ts tsrange, tz tstzrange, mi int4multirange);
INSERT INTO ranges VALUES
 (1, '[1,10)', '(,0]', '[1.5,2.5]', '[2024-01-01,infinity)', '[2024-01-01 00:00,2024-01-02 00:00)', '(,2024-01-01 00:00+00)', '{[1,3),[5,7)}'),
 (2, 'empty', 'empty', 'empty', 'empty', 'empty', 'empty', '{}'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE arrays (id int PRIMARY KEY, i int[], i2 int[][], t text[], n numeric(6,2)[], iv interval[], m mood[], b bool[], ts timestamptz[]);
INSERT INTO arrays VALUES
 (1, '{1,NULL,3}', '{{1,2},{3,4}}', '{\"a,b\",\"with \\\"quote\\\"\",NULL,\"NULL\",\"\"}', '{1.50,NULL,-2.25}', '{P1D,PT2H}', '{sad,happy}', '{t,f,NULL}', '{infinity,\"2024-01-01 00:00:00+00\"}'),
 (2, '[0:1]={7,8}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
 (3, '{}', '{{NULL}}', '{\"\\u00e9\"}', NULL, NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE kinds (id int PRIMARY KEY, m mood, p positive, mo money2, pr pair, prs pair[], u uuid, o oid);
INSERT INTO kinds VALUES
 (1, 'with '' quote', 1, 12.34, ROW(1, 'x, \"y\"'), ARRAY[ROW(1, 'a')::pair, ROW(NULL, NULL)::pair], 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 4294967295),
 (2, 'sad', 2147483647, -0.01, ROW(NULL, ''), '{}', '00000000-0000-0000-0000-000000000000', 0),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

-- Keys of unusual types.
CREATE TABLE text_keys (k text PRIMARY KEY, v int);
INSERT INTO text_keys VALUES (E'\\U0001F600', 1), ('', 2), (E'tab\\tkey', 3), ('NULL', 4);
CREATE TABLE numeric_keys (k numeric(20,5), d date, PRIMARY KEY (k, d), v text);
INSERT INTO numeric_keys VALUES (-0.00001, 'infinity', 'a'), (123456789012345.12345, '4713-01-01 BC', 'b');
";

/// Changes after the snapshot, so every value also travels as a streamed event.
const CHANGES: &str = "
UPDATE numbers SET n = n, r = r WHERE id <= 8;
INSERT INTO numbers SELECT id + 100, n, n102, n5m2, m, r, d, s, i, b FROM numbers;
INSERT INTO texts SELECT id + 100, t, v, c, nm, ch, ci, b FROM texts;
INSERT INTO times SELECT id + 100, d, t, tz, ts, tstz, iv FROM times;
INSERT INTO networks SELECT id + 100, ip, net, mac, mac8, b, vb FROM networks;
INSERT INTO docs SELECT id + 100, tv, tq, x, j, jb, h FROM docs;
INSERT INTO shapes SELECT id + 100, p, l, s, b, pa, po, c FROM shapes;
INSERT INTO ranges SELECT id + 100, i, b, n, d, ts, tz, mi FROM ranges;
INSERT INTO arrays SELECT id + 100, i, i2, t, n, iv, m, b, ts FROM arrays;
INSERT INTO kinds SELECT id + 100, m, p, mo, pr, prs, u, o FROM kinds;
UPDATE text_keys SET v = v + 10;
UPDATE numeric_keys SET v = v || '!';
DELETE FROM texts WHERE id = 2;
";

const TABLES: [(&str, &str); 11] = [
    ("numbers", "id"),
    ("texts", "id"),
    ("times", "id"),
    ("networks", "id"),
    ("docs", "id"),
    ("shapes", "id"),
    ("ranges", "id"),
    ("arrays", "id"),
    ("kinds", "id"),
    ("text_keys", "k"),
    ("numeric_keys", "k, d"),
];

async fn column_types(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .expect("columns")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_family_is_cloned_value_for_value_with_its_type() {
    let cl = Clone::new(
        "sktypes",
        &format!("{SHARED_TYPES}{SOURCE}"),
        &format!(
            "{SHARED_TYPES}
             CREATE TABLE public.generated (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED);"
        ),
        "",
    )
    .await;
    cl.src
        .batch_execute(
            "CREATE TABLE generated (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED);
             INSERT INTO generated (id, v) SELECT g, g FROM generate_series(1, 5) g;",
        )
        .await
        .expect("generated");
    let daemon = Daemon::start(&cl.config, "types");
    let mut all: Vec<(&str, &str)> = TABLES.to_vec();
    all.push(("generated", "id"));
    wait_equal(&cl, &all, Duration::from_secs(120)).await;
    cl.src.batch_execute(CHANGES).await.expect("changes");
    cl.src
        .batch_execute(
            "UPDATE generated SET v = v + 100; INSERT INTO generated (id, v) VALUES (6, 6)",
        )
        .await
        .expect("generated changes");
    wait_equal(&cl, &all, Duration::from_secs(120)).await;
    for (t, _) in TABLES {
        assert_eq!(
            column_types(&cl.dst, t).await,
            column_types(&cl.src, t).await,
            "column types of {t}"
        );
    }
    read_with_an_independent_consumer(&cl).await;
    assert!(
        !daemon.log_text().contains("dead-letter"),
        "no value was dead-lettered: {}",
        daemon.log_text()
    );
    drop(daemon);
    cl.cleanup().await;
}

/// Every record of a topic as `scripts/read-topic.py` (confluent-kafka and fastavro, schemas
/// from the registry) decodes it.
fn python_read(topic: &str) -> Vec<serde_json::Value> {
    let python = std::env::var("BC9_PYTHON").unwrap_or_else(|_| {
        panic!("BC9_PYTHON is not set: run the tests through scripts/test, which installs fastavro and confluent-kafka")
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/read-topic.py");
    let s = stack();
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([&s.bootstrap, &s.registry_url, topic, "3"])
        .output()
        .unwrap_or_else(|e| panic!("{python} {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "the independent consumer failed on {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The `after` image of the first record of `id` in `records`.
fn after_of(records: &[serde_json::Value], id: i64) -> serde_json::Value {
    records
        .iter()
        .find(|r| r["value"]["after"]["id"] == serde_json::json!(id))
        .map(|r| r["value"]["after"].clone())
        .unwrap_or_else(|| panic!("no event of id {id}"))
}

async fn read_with_an_independent_consumer(cl: &Clone) {
    use serde_json::json;
    for (t, _) in TABLES {
        let records = python_read(&cl.spec.topic(t));
        let rows: i64 = cl
            .src
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .expect("count")
            .get(0);
        assert!(
            records.len() as i64 >= rows,
            "{t}: {} records read for {rows} rows",
            records.len()
        );
        // Only dates and timestamps Python's datetime cannot hold may fail the logical
        // conversion (docs/types.md); everything else reads as a Python consumer expects.
        for r in &records {
            for e in r["logical_errors"].as_array().into_iter().flatten() {
                assert!(
                    ["times", "arrays", "numeric_keys"].contains(&t),
                    "{t}: a logical type failed outside dates and timestamps: {e} in {r}"
                );
            }
        }
    }
    let numbers = python_read(&cl.spec.topic("numbers"));
    let row3 = after_of(&numbers, 3);
    assert_eq!(row3["n102"], json!({"decimal": "12345678.91"}));
    assert_eq!(row3["b"], json!(9223372036854775807i64));
    assert_eq!(row3["n"], json!("123456789012345678901234567890.123456789"));
    let row4 = after_of(&numbers, 4);
    assert_eq!(
        row4["n102"],
        json!("NaN"),
        "NaN in numeric(p,s) takes the string branch"
    );
    assert_eq!(row4["r"], json!({"float": "nan"}));
    assert_eq!(after_of(&numbers, 5)["d"], json!({"float": "inf"}));
    let texts = python_read(&cl.spec.topic("texts"));
    let unicode: String = cl
        .src
        .query_one("SELECT t FROM texts WHERE id = 3", &[])
        .await
        .expect("text")
        .get(0);
    assert_eq!(after_of(&texts, 3)["t"], json!(unicode));
    let all_bytes: Vec<u8> = (0..=255).collect();
    use std::io::Write;
    let mut b64 = Vec::new();
    {
        // Base64 without a crate: the alphabet over 3-byte groups (256 bytes: 85 groups + 1).
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for chunk in all_bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            let chars = chunk.len() + 1;
            for k in 0..4 {
                if k < chars {
                    b64.write_all(&[A[((n >> (18 - 6 * k)) & 63) as usize]])
                        .expect("write");
                } else {
                    b64.write_all(b"=").expect("write");
                }
            }
        }
    }
    assert_eq!(
        after_of(&texts, 4)["b"],
        json!({"bytes": String::from_utf8(b64).expect("ascii")})
    );
    let times = python_read(&cl.spec.topic("times"));
    let row5 = after_of(&times, 5);
    assert_eq!(row5["d"], json!({"iso": "2000-02-29"}));
    assert_eq!(row5["ts"], json!({"iso": "1999-12-31T23:59:59.500000"}));
    let infinity = times
        .iter()
        .find(|r| r["value"]["after"]["id"] == json!(1))
        .expect("row 1");
    assert_eq!(
        infinity["value"]["after"]["d"],
        json!(2147483647),
        "date infinity is i32 max, raw"
    );
}
