//! JSON text for requests and tool-call arguments, written the way
//! `serde_json::to_string` writes it except for floats.
//!
//! Why not `serde_json::to_string`: its float formatter (the `zmij` crate)
//! brings about 15 KB of tables into the plugin's data segment, and every
//! live instance of a provider maps its whole data image: with a thousand
//! streams open that is 15 MB of resident memory for a routine that runs
//! when a temperature is sent. Rust's own float formatting is shortest
//! round-trip too, with a fraction of the tables.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// `value` as compact JSON text, as `serde_json::to_string` would write it
/// (floats may differ in form, never in value: `1e21` for `1e+21`).
///
/// Use it instead of `to_string` on a `serde_json::Value` in a provider:
/// see the module documentation for why.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(128);
    // Writing to a Vec cannot fail, and a `Serialize` of `Value` or of a
    // derived type never errors; a hand-written one that does gets `null`.
    if value.serialize(&mut Serializer::with_formatter(&mut out, Floats)).is_err() {
        return "null".into();
    }
    // serde_json's serializer writes only UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json's compact form (the trait's default methods) with floats
/// written by `Debug`, which is shortest round-trip and always valid JSON
/// for the finite values the serializer hands a formatter (it writes NaN
/// and infinities as `null` itself): `0.7`, `1.0`, `1e-7`, `1e21`.
struct Floats;

impl Formatter for Floats {
    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        write!(writer, "{value:?}")
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        write!(writer, "{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    #[test]
    fn same_text_as_serde_json_except_float_form() {
        // Strings, escapes, integers at their limits, nesting: the same text.
        let plain = [
            json!({"text": "quote \" backslash \\ newline \n tab \t bell \u{7} é 😀", "stop": null, "stream": true}),
            json!({"nested": {"a": [1, -2, 18446744073709551615u64, -9223372036854775808i64], "b": []}}),
        ];
        for value in plain {
            assert_eq!(super::to_string(&value), value.to_string());
        }
        // Floats: the same values, read back.
        let floats = json!([0.7, 0.1, 1.0, -0.0, 1e-7, 1e21, 123456.789, f64::MAX, f64::MIN_POSITIVE, 5e-324]);
        let text = super::to_string(&floats);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), floats, "{text}");
        assert_eq!(super::to_string(&json!({"temperature": 0.7, "n": 1.0})), r#"{"n":1.0,"temperature":0.7}"#);
    }

    #[test]
    fn floats_that_json_cannot_hold_are_null() {
        assert_eq!(super::to_string(&[f64::NAN, f64::INFINITY]), "[null,null]");
    }
}
