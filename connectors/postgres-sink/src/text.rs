//! Column values as PostgreSQL reads them in `COPY ... FROM STDIN` text format: the inverse of
//! the source's type mapping (`docs/types.md`), so a value read from a source table is written
//! back to the same type unchanged.

use bitclone9_core::{ColumnType, Value};
use std::fmt::Write;

/// A value whose shape does not fit its column's type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("value {value} does not fit column type {ty}")]
pub struct TextError {
    pub value: String,
    pub ty: String,
}

fn mismatch(v: &Value, ty: &ColumnType) -> TextError {
    TextError {
        value: format!("{v:?}").chars().take(64).collect(),
        ty: format!("{ty:?}"),
    }
}

/// Appends `s` escaped for COPY text format.
pub fn copy_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

/// Appends one COPY field: `\N` for NULL, else the escaped text form of `v`.
pub fn copy_field(out: &mut String, v: &Value, ty: &ColumnType) -> Result<(), TextError> {
    match v {
        Value::Null | Value::UnchangedToast => {
            out.push_str("\\N");
            Ok(())
        }
        Value::Text(s) => {
            copy_escape(out, s);
            Ok(())
        }
        Value::Bytes(_) | Value::Array(_) => {
            let mut plain = String::new();
            pg_text(&mut plain, v, ty)?;
            copy_escape(out, &plain);
            Ok(())
        }
        _ => pg_text(out, v, ty),
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (year 0 is 1 BC).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn write_date(out: &mut String, days: i64) -> (bool, ()) {
    let (y, m, d) = civil_from_days(days);
    let bc = y <= 0;
    let year = if bc { 1 - y } else { y };
    let _ = write!(out, "{year:04}-{m:02}-{d:02}");
    (bc, ())
}

fn write_time(out: &mut String, micros: i64) {
    let (h, rest) = (micros / 3_600_000_000, micros % 3_600_000_000);
    let (mi, rest) = (rest / 60_000_000, rest % 60_000_000);
    let (s, us) = (rest / 1_000_000, rest % 1_000_000);
    let _ = write!(out, "{h:02}:{mi:02}:{s:02}");
    if us != 0 {
        let _ = write!(out, ".{us:06}");
    }
}

fn write_timestamp(out: &mut String, micros: i64, tz: bool) {
    match micros {
        i64::MAX => return out.push_str("infinity"),
        i64::MIN => return out.push_str("-infinity"),
        _ => {}
    }
    let days = micros.div_euclid(86_400_000_000);
    let (bc, ()) = write_date(out, days);
    out.push(' ');
    write_time(out, micros.rem_euclid(86_400_000_000));
    if tz {
        out.push_str("+00");
    }
    if bc {
        out.push_str(" BC");
    }
}

fn write_float(out: &mut String, f: f64, text: impl std::fmt::Display) {
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        let _ = write!(out, "{text}");
    }
}

/// The decimal digits of a big-endian magnitude.
fn digits(mut mag: Vec<u8>) -> String {
    if mag.len() <= 16 {
        let mut v: u128 = 0;
        for b in &mag {
            v = (v << 8) | u128::from(*b);
        }
        return v.to_string();
    }
    // Long division by 10^9, most significant byte first.
    let mut chunks: Vec<u32> = Vec::new();
    while mag.iter().any(|b| *b != 0) {
        let mut rem: u64 = 0;
        for b in mag.iter_mut() {
            let cur = (rem << 8) | u64::from(*b);
            *b = (cur / 1_000_000_000) as u8;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let mut s = String::new();
    for (i, c) in chunks.iter().rev().enumerate() {
        if i == 0 {
            let _ = write!(s, "{c}");
        } else {
            let _ = write!(s, "{c:09}");
        }
    }
    if s.is_empty() {
        s.push('0');
    }
    s
}

/// Writes an exact decimal from its unscaled big-endian two's complement bytes.
fn write_decimal(out: &mut String, bytes: &[u8], scale: u32) {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut mag = bytes.to_vec();
    if negative {
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    let d = digits(mag);
    if negative && d != "0" {
        out.push('-');
    }
    let scale = scale as usize;
    if scale == 0 {
        out.push_str(&d);
    } else if d.len() > scale {
        out.push_str(&d[..d.len() - scale]);
        out.push('.');
        out.push_str(&d[d.len() - scale..]);
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', scale - d.len()));
        out.push_str(&d);
    }
}

/// Appends PostgreSQL's text input form of a non-null `v` of type `ty` (not COPY-escaped).
pub fn pg_text(out: &mut String, v: &Value, ty: &ColumnType) -> Result<(), TextError> {
    match (ty, v) {
        (ColumnType::Date, Value::Int(d)) => match *d {
            i32::MAX => out.push_str("infinity"),
            i32::MIN => out.push_str("-infinity"),
            d => {
                if write_date(out, i64::from(d)).0 {
                    out.push_str(" BC");
                }
            }
        },
        (ColumnType::Time, Value::Long(us)) => write_time(out, *us),
        (ColumnType::Timestamp, Value::Long(us)) => write_timestamp(out, *us, false),
        (ColumnType::TimestampTz, Value::Long(us)) => write_timestamp(out, *us, true),
        (ColumnType::Decimal { scale, .. }, Value::Decimal(b)) => write_decimal(out, b, *scale),
        (_, Value::Int(i)) => {
            let _ = write!(out, "{i}");
        }
        (_, Value::Long(i)) => {
            let _ = write!(out, "{i}");
        }
        (_, Value::Float(f)) => write_float(out, f64::from(*f), f),
        (_, Value::Double(f)) => write_float(out, *f, f),
        (_, Value::Bool(b)) => out.push(if *b { 't' } else { 'f' }),
        (_, Value::Text(s)) => out.push_str(s),
        (_, Value::Bytes(b)) => {
            out.push_str("\\x");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        (ColumnType::Array(elem), Value::Array(items)) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if matches!(item, Value::Null) {
                    out.push_str("NULL");
                    continue;
                }
                let mut s = String::new();
                pg_text(&mut s, item, elem)?;
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
            out.push('}');
        }
        (ty, v) => return Err(mismatch(v, ty)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: Value, ty: ColumnType) -> String {
        let mut s = String::new();
        copy_field(&mut s, &v, &ty).expect("fits");
        s
    }

    #[test]
    fn dates_and_times_match_postgres_forms() {
        assert_eq!(text(Value::Int(0), ColumnType::Date), "1970-01-01");
        assert_eq!(text(Value::Int(19782), ColumnType::Date), "2024-02-29");
        assert_eq!(text(Value::Int(-719528), ColumnType::Date), "0001-01-01 BC");
        assert_eq!(text(Value::Int(-719162), ColumnType::Date), "0001-01-01");
        assert_eq!(text(Value::Int(i32::MAX), ColumnType::Date), "infinity");
        assert_eq!(
            text(Value::Long(86_400_000_000), ColumnType::Time),
            "24:00:00"
        );
        assert_eq!(
            text(Value::Long(45_045_123_456), ColumnType::Time),
            "12:30:45.123456"
        );
        assert_eq!(
            text(Value::Long(1_709_209_845_000_001), ColumnType::TimestampTz),
            "2024-02-29 12:30:45.000001+00"
        );
        assert_eq!(
            text(
                Value::Long(-62_135_596_800_000_000 - 1),
                ColumnType::Timestamp
            ),
            "0001-12-31 23:59:59.999999 BC"
        );
        assert_eq!(
            text(Value::Long(i64::MIN), ColumnType::Timestamp),
            "-infinity"
        );
    }

    #[test]
    fn decimals_keep_their_scale() {
        let dec = |b: &[u8], scale| {
            text(
                Value::Decimal(b.to_vec()),
                ColumnType::Decimal {
                    precision: 40,
                    scale,
                },
            )
        };
        assert_eq!(dec(&[0x01, 0x2c], 2), "3.00");
        assert_eq!(dec(&[0xcf, 0xc7], 2), "-123.45");
        assert_eq!(dec(&[0x05], 3), "0.005");
        assert_eq!(dec(&[0xfb], 3), "-0.005");
        assert_eq!(dec(&[0x00], 0), "0");
        // 2^136 = 87112285931760246646623899502532662132736, beyond u128.
        let mut big = vec![0x01];
        big.extend([0u8; 17]);
        assert_eq!(dec(&big, 4), "8711228593176024664662389950253266213.2736");
        assert_eq!(dec(&[0xff; 18], 0), "-1");
    }

    #[test]
    fn text_bytes_arrays_and_floats_are_escaped() {
        assert_eq!(
            text(Value::Text("a\tb\\c\n".into()), ColumnType::Text),
            "a\\tb\\\\c\\n"
        );
        assert_eq!(
            text(Value::Bytes(vec![0xde, 0xad]), ColumnType::Bytes),
            "\\\\xdead"
        );
        assert_eq!(
            text(
                Value::Array(vec![
                    Value::Text("x\"y".into()),
                    Value::Null,
                    Value::Text("NULL".into())
                ]),
                ColumnType::Array(Box::new(ColumnType::Text))
            ),
            "{\"x\\\\\"y\",NULL,\"NULL\"}"
        );
        assert_eq!(text(Value::Double(f64::NAN), ColumnType::Float64), "NaN");
        assert_eq!(
            text(Value::Float(f32::NEG_INFINITY), ColumnType::Float32),
            "-Infinity"
        );
        assert_eq!(text(Value::Double(0.1), ColumnType::Float64), "0.1");
        assert_eq!(text(Value::Null, ColumnType::Text), "\\N");
        let mut s = String::new();
        assert!(pg_text(&mut s, &Value::Array(vec![]), &ColumnType::Int32).is_err());
    }
}
