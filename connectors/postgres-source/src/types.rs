//! PostgreSQL types → [`ColumnType`], and text-format values → [`Value`].
//!
//! Both the snapshot (`COPY ... TO STDOUT`, text) and the stream (pgoutput, text) hand over values
//! in PostgreSQL's text output format, so one parser serves both. The session settings in
//! [`SESSION_SETTINGS`] fix the formats this parser expects (ISO dates, UTC, hex bytea).

use bitclone9_core::{ColumnType, Value};
use std::collections::HashMap;

/// Settings every source session runs with, so text values have one format.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// A value that does not parse as its column type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot read {text:?} as {ty}: {why}")]
pub struct ValueError {
    pub ty: String,
    pub text: String,
    pub why: &'static str,
}

/// What the catalog says of a type that is not built in (`pg_type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    pub oid: u32,
    /// `typtype`: b base, d domain, e enum, c composite, r range, m multirange, p pseudo.
    pub kind: u8,
    /// `typcategory`: A for arrays.
    pub category: u8,
    /// `typelem`: the element type of an array.
    pub elem: u32,
    /// `typbasetype`/`typtypmod`: what a domain is over.
    pub base: u32,
    pub base_typmod: i32,
}

/// The OIDs of the built-in types this module maps; others are looked up in `pg_type`.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

fn builtin(type_oid: u32, typmod: i32) -> Option<ColumnType> {
    use oid::*;
    Some(match type_oid {
        BOOL => ColumnType::Bool,
        BYTEA => ColumnType::Bytes,
        CHAR | NAME | TEXT | BPCHAR | VARCHAR => ColumnType::Text,
        INT2 => ColumnType::Int16,
        INT4 => ColumnType::Int32,
        INT8 => ColumnType::Int64,
        FLOAT4 => ColumnType::Float32,
        FLOAT8 => ColumnType::Float64,
        JSON | JSONB => ColumnType::Json,
        DATE => ColumnType::Date,
        TIME => ColumnType::Time,
        TIMESTAMP => ColumnType::Timestamp,
        TIMESTAMPTZ => ColumnType::TimestampTz,
        UUID => ColumnType::Uuid,
        NUMERIC => numeric(typmod),
        _ => return None,
    })
}

/// `numeric(p,s)` is an exact decimal; unconstrained `numeric`, or a scale Avro cannot hold
/// (negative, or above the precision), travels as text.
fn numeric(typmod: i32) -> ColumnType {
    if typmod < 4 {
        return ColumnType::Other;
    }
    let t = typmod - 4;
    let precision = ((t >> 16) & 0xffff) as u32;
    let scale = (((t & 0x7ff) ^ 1024) - 1024) as i64;
    if scale < 0 || scale as u32 > precision || precision == 0 {
        return ColumnType::Other;
    }
    ColumnType::Decimal {
        precision,
        scale: scale as u32,
    }
}

/// The OIDs `column_type` needs from the catalog before it can map `type_oid`.
pub fn needs_lookup(type_oid: u32, known: &HashMap<u32, PgType>) -> Option<u32> {
    if builtin(type_oid, -1).is_some() {
        return None;
    }
    match known.get(&type_oid) {
        None => Some(type_oid),
        Some(t) if t.kind == b'd' => needs_lookup(t.base, known),
        Some(t) if t.category == b'A' && t.elem != 0 => needs_lookup(t.elem, known),
        Some(_) => None,
    }
}

/// Maps a column's type; `known` must hold every OID [`needs_lookup`] asked for.
pub fn column_type(type_oid: u32, typmod: i32, known: &HashMap<u32, PgType>) -> ColumnType {
    if let Some(t) = builtin(type_oid, typmod) {
        return t;
    }
    let Some(t) = known.get(&type_oid) else {
        return ColumnType::Other;
    };
    match t.kind {
        b'd' => column_type(t.base, t.base_typmod, known),
        b'e' => ColumnType::Enum,
        _ if t.category == b'A' && t.elem != 0 => {
            match column_type(t.elem, typmod, known) {
                // Arrays of unmapped types and nested arrays go as text.
                ColumnType::Other | ColumnType::Array(_) => ColumnType::Other,
                elem => ColumnType::Array(Box::new(elem)),
            }
        }
        _ => ColumnType::Other,
    }
}

/// Parses one text-format value.
pub fn parse_text(ty: &ColumnType, text: &str) -> Result<Value, ValueError> {
    let fail = |why: &'static str| ValueError {
        ty: type_label(ty).to_string(),
        text: text.chars().take(64).collect(),
        why,
    };
    Ok(match ty {
        ColumnType::Int16 | ColumnType::Int32 => {
            Value::Int(text.parse().map_err(|_| fail("not an integer"))?)
        }
        ColumnType::Int64 => Value::Long(text.parse().map_err(|_| fail("not an integer"))?),
        ColumnType::Float32 => Value::Float(text.parse().map_err(|_| fail("not a number"))?),
        ColumnType::Float64 => Value::Double(text.parse().map_err(|_| fail("not a number"))?),
        ColumnType::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(fail("not t or f")),
        },
        ColumnType::Text
        | ColumnType::Uuid
        | ColumnType::Json
        | ColumnType::Enum
        | ColumnType::Other => Value::Text(text.to_string()),
        ColumnType::Bytes => Value::Bytes(parse_bytea(text).ok_or_else(|| fail("not hex bytea"))?),
        ColumnType::Decimal { scale, .. } => match parse_decimal(text, *scale) {
            Some(d) => Value::Decimal(d),
            // Values a decimal cannot hold travel in their text form (`schema::has_text_form`).
            None if matches!(text, "NaN" | "Infinity" | "-Infinity") => {
                Value::Text(text.to_string())
            }
            None => return Err(fail("not a decimal of that scale")),
        },
        ColumnType::Date => Value::Int(parse_date(text).ok_or_else(|| fail("not an ISO date"))?),
        ColumnType::Time => Value::Long(parse_time(text).ok_or_else(|| fail("not an ISO time"))?),
        ColumnType::Timestamp | ColumnType::TimestampTz => {
            Value::Long(parse_timestamp(text).ok_or_else(|| {
                fail("not an ISO timestamp within 64 bits of microseconds from 1970")
            })?)
        }
        // An array that is not one-dimensional from index 1, or has an element its element type
        // cannot hold, travels in its text form, which keeps dimensions and bounds.
        ColumnType::Array(elem) => match parse_array(elem, text) {
            Some(values) => Value::Array(values),
            None if text.starts_with(['{', '[']) && text.ends_with('}') => {
                Value::Text(text.to_string())
            }
            None => return Err(fail("not an array literal")),
        },
    })
}

/// A one-dimensional array literal with lower bound 1 whose elements all parse as `elem`.
fn parse_array(elem: &ColumnType, text: &str) -> Option<Vec<Value>> {
    let items = split_array(text).ok()?;
    let mut values = Vec::with_capacity(items.len());
    for item in items {
        values.push(match item {
            None => Value::Null,
            Some(s) => match parse_text(elem, &s).ok()? {
                // A decimal element in text form (NaN) cannot stand inside an array of decimals.
                Value::Text(_) if matches!(elem, ColumnType::Decimal { .. }) => return None,
                v => v,
            },
        });
    }
    Some(values)
}

fn type_label(ty: &ColumnType) -> &'static str {
    match ty {
        ColumnType::Int16 => "smallint",
        ColumnType::Int32 => "integer",
        ColumnType::Int64 => "bigint",
        ColumnType::Float32 => "real",
        ColumnType::Float64 => "double precision",
        ColumnType::Bool => "boolean",
        ColumnType::Text => "text",
        ColumnType::Bytes => "bytea",
        ColumnType::Decimal { .. } => "numeric",
        ColumnType::Date => "date",
        ColumnType::Time => "time",
        ColumnType::Timestamp => "timestamp",
        ColumnType::TimestampTz => "timestamptz",
        ColumnType::Uuid => "uuid",
        ColumnType::Json => "json",
        ColumnType::Enum => "enum",
        ColumnType::Array(_) => "array",
        ColumnType::Other => "text form",
    }
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// `-123.45` at scale 2 → the unscaled integer -12345 as minimal big-endian two's complement.
pub fn parse_decimal(text: &str, scale: u32) -> Option<Vec<u8>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty()) || frac.len() > scale as usize {
        return None;
    }
    // Magnitude as big-endian base-256, built digit by digit.
    let mut mag: Vec<u8> = vec![0];
    let pad = scale as usize - frac.len();
    for c in int
        .bytes()
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', pad))
    {
        if !c.is_ascii_digit() {
            return None;
        }
        let mut carry = u32::from(c - b'0');
        for byte in mag.iter_mut().rev() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = v as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.insert(0, carry as u8);
            carry >>= 8;
        }
    }
    while mag.len() > 1 && mag[0] == 0 {
        mag.remove(0);
    }
    if mag[0] & 0x80 != 0 {
        mag.insert(0, 0);
    }
    if negative && mag.iter().any(|&b| b != 0) {
        // Two's complement: invert and add one.
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
        // Drop redundant leading 0xff bytes.
        while mag.len() > 1 && mag[0] == 0xff && mag[1] & 0x80 != 0 {
            mag.remove(0);
        }
    }
    Some(mag)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical years).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` → (days since epoch, rest of the text after the date); `bc` for years before 1 AD.
fn parse_date_prefix(text: &str, bc: bool) -> Option<(i64, &str)> {
    let (year, rest) = text.split_once('-')?;
    // PostgreSQL's years end at 5874897; more digits would overflow the day count.
    if year.is_empty() || year.len() > 7 || !year.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let month: u32 = rest.get(0..2)?.parse().ok()?;
    if rest.as_bytes().get(2) != Some(&b'-') {
        return None;
    }
    let day: u32 = rest.get(3..5)?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year: i64 = year.parse().ok()?;
    // Year 1 BC is astronomical year 0.
    let year = if bc { 1 - year } else { year };
    Some((days_from_civil(year, month, day), &rest[5..]))
}

/// Splits off the ` BC` suffix PostgreSQL prints after dates before 1 AD.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

fn parse_date(text: &str) -> Option<i32> {
    match text {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (days, rest) = parse_date_prefix(text, bc)?;
    rest.is_empty().then_some(i32::try_from(days).ok()?)
}

/// `HH:MM:SS[.ffffff]` → (microseconds since midnight, rest).
fn parse_time_prefix(text: &str) -> Option<(i64, &str)> {
    let b = text.as_bytes();
    if b.len() < 8 || !b[..8].is_ascii() || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h: i64 = text[0..2].parse().ok()?;
    let m: i64 = text[3..5].parse().ok()?;
    let s: i64 = text[6..8].parse().ok()?;
    let mut rest = &text[8..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = frac[..n].parse::<i64>().ok()? * 10i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    if h > 24 || m > 59 || s > 60 {
        return None;
    }
    Some((((h * 60 + m) * 60 + s) * 1_000_000 + micros, rest))
}

fn parse_time(text: &str) -> Option<i64> {
    let (t, rest) = parse_time_prefix(text)?;
    rest.is_empty().then_some(t)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` → microseconds since the epoch (UTC when an
/// offset is given).
fn parse_timestamp(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (days, rest) = parse_date_prefix(text, bc)?;
    let rest = rest.strip_prefix(' ')?;
    let (time, mut rest) = parse_time_prefix(rest)?;
    let mut offset_secs = 0i64;
    if let Some(sign) = rest.chars().next().filter(|c| *c == '+' || *c == '-') {
        let mut secs = 0i64;
        let parts = &rest[1..];
        for (i, p) in parts.split(':').enumerate() {
            if p.len() != 2 || i > 2 {
                return None;
            }
            secs += p.parse::<i64>().ok()? * [3600, 60, 1][i];
        }
        offset_secs = if sign == '-' { -secs } else { secs };
        rest = &rest[1 + parts.len()..];
    }
    if !rest.is_empty() {
        return None;
    }
    (days * 86_400 - offset_secs)
        .checked_mul(1_000_000)?
        .checked_add(time)
}

/// Splits a one-dimensional array literal into its elements (`None` for NULL).
fn split_array(text: &str) -> Result<Vec<Option<String>>, &'static str> {
    // Arrays with other bounds than 1 print them first, `[0:2]={1,2,3}`: they are not split, so
    // that they keep their bounds in text form.
    let inner = text
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or("not an array literal")?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Ok(items);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => item.push(chars.next().ok_or("dangling escape")?),
                    Some('"') => break,
                    Some(c) => item.push(c),
                    None => return Err("unterminated quoted element"),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' {
                    return Err("multi-dimensional arrays are not supported");
                }
                item.push(c);
                chars.next();
            }
        }
        items.push(if !quoted && item == "NULL" {
            None
        } else {
            Some(item)
        });
        match chars.next() {
            None => return Ok(items),
            Some(',') => {}
            Some(_) => return Err("text after a quoted element"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str, scale: u32) -> Vec<u8> {
        parse_decimal(text, scale).expect("decimal parses")
    }

    #[test]
    fn decimals_are_minimal_twos_complement() {
        assert_eq!(dec("0", 0), vec![0]);
        assert_eq!(dec("1.5", 1), vec![15]);
        assert_eq!(dec("127", 0), vec![127]);
        assert_eq!(dec("128", 0), vec![0, 128]);
        assert_eq!(dec("-1", 0), vec![0xff]);
        assert_eq!(dec("-128", 0), vec![0x80]);
        assert_eq!(dec("-129", 0), vec![0xff, 0x7f]);
        assert_eq!(dec("-123.45", 2), (-12345i16).to_be_bytes().to_vec());
        assert_eq!(dec("12.3", 3), 12300i16.to_be_bytes().to_vec());
        assert_eq!(dec("-0.00", 2), vec![0], "negative zero is zero");
        let big = dec("123456789012345678901234567890", 0);
        assert_eq!(
            big,
            123456789012345678901234567890i128.to_be_bytes()[3..].to_vec()
        );
        assert!(parse_decimal("NaN", 2).is_none());
        assert!(parse_decimal("1.234", 2).is_none());
        assert!(parse_decimal("", 2).is_none());
        assert!(parse_decimal("1e5", 2).is_none());
        // What a decimal cannot hold keeps its text form; other text is an error.
        let ty = ColumnType::Decimal {
            precision: 10,
            scale: 2,
        };
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(parse_text(&ty, special), Ok(Value::Text(special.into())));
        }
        assert!(parse_text(&ty, "nan").is_err());
        assert!(parse_text(&ty, "1.234").is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-03-01"), Some(11017));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        assert_eq!(parse_date("0001-01-01 BC"), Some(-719_528));
        assert_eq!(parse_date("infinity"), Some(i32::MAX));
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(parse_time("00:00:00"), Some(0));
        assert_eq!(parse_time("13:14:15.5"), Some(47_655_500_000));
        assert_eq!(parse_time("24:00:00"), Some(86_400_000_000));
        assert_eq!(parse_time("1:00:00"), None);
        assert_eq!(
            parse_time("12:0é:00"),
            None,
            "non-ASCII is refused, not a panic"
        );
        assert_eq!(parse_timestamp("1970-01-01 00:00:01"), Some(1_000_000));
        assert_eq!(
            parse_timestamp("2024-02-29 12:30:45.123456+00"),
            Some(1_709_209_845_123_456)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 14:30:45.123456+02"),
            Some(1_709_209_845_123_456)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 07:00:45.123456-05:30"),
            Some(1_709_209_845_123_456)
        );
        assert_eq!(
            parse_timestamp("0001-01-01 00:00:00 BC"),
            Some(-719_528 * 86_400 * 1_000_000)
        );
        assert_eq!(parse_timestamp("-infinity"), Some(i64::MIN));
        // Found by the pgoutput_decode fuzz target: a year whose day count overflowed.
        assert_eq!(parse_date("1111111111111111110-07-11"), None);
        assert_eq!(parse_timestamp("1111111111111111110-07-11 00:00:00"), None);
        assert_eq!(parse_date("5874897-12-31"), Some(2_145_042_905));
        assert_eq!(parse_timestamp("2024-02-29T12:30:45"), None);
    }

    #[test]
    fn arrays() {
        let ints = ColumnType::Array(Box::new(ColumnType::Int32));
        assert_eq!(
            parse_text(&ints, "{1,NULL,-3}"),
            Ok(Value::Array(vec![
                Value::Int(1),
                Value::Null,
                Value::Int(-3)
            ]))
        );
        assert_eq!(parse_text(&ints, "{}"), Ok(Value::Array(vec![])));
        // Other bounds than 1 and more dimensions keep their text form, which holds both.
        for text in ["[0:1]={5,6}", "{{1,2},{3,4}}", "[2:2][1:1]={{7}}", "{{}}"] {
            assert_eq!(parse_text(&ints, text), Ok(Value::Text(text.into())));
        }
        let decimals = ColumnType::Array(Box::new(ColumnType::Decimal {
            precision: 5,
            scale: 1,
        }));
        assert_eq!(
            parse_text(&decimals, "{1.5,NULL}"),
            Ok(Value::Array(vec![Value::Decimal(vec![15]), Value::Null]))
        );
        assert_eq!(
            parse_text(&decimals, "{1.5,NaN}"),
            Ok(Value::Text("{1.5,NaN}".into()))
        );
        let texts = ColumnType::Array(Box::new(ColumnType::Text));
        assert_eq!(
            parse_text(&texts, r#"{plain,"with, comma","quote \" and \\","NULL"}"#),
            Ok(Value::Array(vec![
                Value::Text("plain".into()),
                Value::Text("with, comma".into()),
                Value::Text("quote \" and \\".into()),
                Value::Text("NULL".into()),
            ]))
        );
        assert!(parse_text(&ints, "1,2").is_err());
        assert!(parse_text(&ints, "").is_err());
    }

    #[test]
    fn scalars_and_errors() {
        assert_eq!(
            parse_text(&ColumnType::Bytes, "\\x00ff10"),
            Ok(Value::Bytes(vec![0, 255, 16]))
        );
        assert_eq!(parse_text(&ColumnType::Bool, "t"), Ok(Value::Bool(true)));
        assert_eq!(
            parse_text(&ColumnType::Float64, "-Infinity"),
            Ok(Value::Double(f64::NEG_INFINITY))
        );
        let err = parse_text(&ColumnType::Int32, "12x").expect_err("rejects");
        assert_eq!(err.ty, "integer");
        assert!(err.to_string().contains("12x"));
    }

    #[test]
    fn type_mapping() {
        let mut known = HashMap::new();
        assert_eq!(
            column_type(oid::NUMERIC, ((12 << 16) | 3) + 4, &known),
            ColumnType::Decimal {
                precision: 12,
                scale: 3
            }
        );
        assert_eq!(column_type(oid::NUMERIC, -1, &known), ColumnType::Other);
        assert_eq!(needs_lookup(90001, &known), Some(90001));
        known.insert(
            90001,
            PgType {
                oid: 90001,
                kind: b'e',
                category: b'E',
                elem: 0,
                base: 0,
                base_typmod: -1,
            },
        );
        known.insert(
            90002,
            PgType {
                oid: 90002,
                kind: b'b',
                category: b'A',
                elem: 90001,
                base: 0,
                base_typmod: -1,
            },
        );
        known.insert(
            90003,
            PgType {
                oid: 90003,
                kind: b'd',
                category: b'N',
                elem: 0,
                base: oid::INT8,
                base_typmod: -1,
            },
        );
        assert_eq!(needs_lookup(90002, &known), None);
        assert_eq!(column_type(90001, -1, &known), ColumnType::Enum);
        assert_eq!(
            column_type(90002, -1, &known),
            ColumnType::Array(Box::new(ColumnType::Enum))
        );
        assert_eq!(column_type(90003, -1, &known), ColumnType::Int64);
    }
}
