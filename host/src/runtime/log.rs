//! The `log` capability: plugin log lines into the host's tracing.
//!
//! A plugin's message is its own text in the operator's log, so it is made
//! harmless there: control characters (newlines, ANSI escapes) are escaped,
//! so one call is one line and cannot pass for a line of the host's own,
//! and each plugin's lines are rate-limited, the excess dropped and counted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bindings::wit_log::{Host, Level};
use super::state::PluginState;

/// The longest message kept, after escaping.
const MAX_LINE: usize = 4096;
/// Lines per second a plugin may log, on average, and at once.
const LINES_PER_SEC: f64 = 50.0;
const BURST_LINES: f64 = 200.0;
/// Bytes per second a plugin may log, on average, and at once.
const BYTES_PER_SEC: f64 = 64.0 * 1024.0;
const BURST_BYTES: f64 = 256.0 * 1024.0;
/// How often dropped lines are reported, at most.
const REPORT_EVERY: Duration = Duration::from_secs(1);

impl Host for PluginState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        // Weighed before it is escaped, so a dropped line costs next to nothing.
        let (admitted, dropped) = self.log_gate.admit(Instant::now(), message.len().min(MAX_LINE));
        if let Some(dropped) = dropped {
            tracing::warn!(target: "hangar::plugin", plugin, dropped,
                "plugin logged over its rate ({LINES_PER_SEC} lines and {} KiB a second); lines dropped", BYTES_PER_SEC as u64 / 1024);
        }
        if !admitted {
            return Ok(());
        }
        let message = escape(&message);
        match level {
            Level::Trace => tracing::trace!(target: "hangar::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "hangar::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "hangar::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "hangar::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "hangar::plugin", plugin, "{message}"),
        }
        Ok(())
    }
}

/// `message` on one line: control characters (`\n`, `\r`, ESC and the rest
/// of C0 and C1, DEL) and the invisible characters that reorder or break
/// lines are written as escapes; cut to [`MAX_LINE`] bytes.
fn escape(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_LINE));
    for c in message.chars() {
        let invisible = matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || invisible {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str(" …");
            break;
        }
    }
    out
}

/// One plugin's log budget, shared by all its calls: token buckets of lines
/// and of bytes.
#[derive(Debug)]
pub struct LogGate(Mutex<Bucket>);

#[derive(Debug)]
struct Bucket {
    lines: f64,
    bytes: f64,
    refilled: Instant,
    dropped: u64,
    reported: Option<Instant>,
}

impl Default for LogGate {
    fn default() -> Self {
        LogGate(Mutex::new(Bucket { lines: BURST_LINES, bytes: BURST_BYTES, refilled: Instant::now(), dropped: 0, reported: None }))
    }
}

impl LogGate {
    /// Whether a line of `len` bytes may be written at `now`, and the lines
    /// dropped so far to report now (at most once per [`REPORT_EVERY`]).
    fn admit(&self, now: Instant, len: usize) -> (bool, Option<u64>) {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.refilled = now;
        b.lines = (b.lines + elapsed * LINES_PER_SEC).min(BURST_LINES);
        b.bytes = (b.bytes + elapsed * BYTES_PER_SEC).min(BURST_BYTES);
        let cost = len as f64;
        let admitted = b.lines >= 1.0 && b.bytes >= cost;
        if admitted {
            b.lines -= 1.0;
            b.bytes -= cost;
        } else {
            b.dropped += 1;
        }
        let due = b.reported.is_none_or(|at| now.saturating_duration_since(at) >= REPORT_EVERY);
        let report = (b.dropped > 0 && due).then(|| {
            b.reported = Some(now);
            std::mem::take(&mut b.dropped)
        });
        (admitted, report)
    }
}

// `types` holds only type definitions; linking it needs an (empty) host.
impl super::bindings::types::Host for PluginState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_onto_one_line() {
        let forged = "ok\n2026-01-01T00:00:00Z  INFO hangar: plugin installed\x1b[2K\r\u{202e}\u{85}\x7f";
        let line = escape(forged);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert_eq!(line, "ok\\n2026-01-01T00:00:00Z  INFO hangar: plugin installed\\u{1b}[2K\\r\\u{202e}\\u{85}\\u{7f}");
        assert_eq!(escape("plain text, ünïcode"), "plain text, ünïcode");
    }

    #[test]
    fn a_long_message_is_cut_after_escaping() {
        let line = escape(&"\n".repeat(10_000));
        assert!(line.len() <= MAX_LINE + " …".len(), "{}", line.len());
        assert!(line.ends_with(" …"));
        let line = escape(&"é".repeat(10_000));
        assert!(line.len() <= MAX_LINE + " …".len());
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_drops_are_counted() {
        let gate = LogGate::default();
        let start = Instant::now();
        let mut written = 0;
        let mut reported = 0;
        // 100,000 short lines within one second.
        for i in 0..100_000u32 {
            let now = start + Duration::from_micros(i as u64 * 10);
            let (ok, dropped) = gate.admit(now, 10);
            written += ok as u64;
            reported += dropped.unwrap_or(0);
        }
        assert!(written <= (BURST_LINES + LINES_PER_SEC) as u64 + 1, "{written}");
        assert!(written >= BURST_LINES as u64, "the burst goes through: {written}");
        // What was not written is reported once the gate lets lines again.
        let (ok, dropped) = gate.admit(start + Duration::from_secs(3), 10);
        assert!(ok);
        assert_eq!(written + reported + dropped.unwrap_or(0), 100_001 - 1, "every line is written or counted");
    }

    #[test]
    fn bytes_are_capped_as_well_as_lines() {
        let gate = LogGate::default();
        let now = Instant::now();
        let admitted = (0..100).filter(|_| gate.admit(now, MAX_LINE).0).count();
        assert_eq!(admitted, BURST_BYTES as usize / MAX_LINE);
    }
}
