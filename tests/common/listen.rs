//! Reads a starting `hangar`'s log (its stderr) for the address it listens
//! on. Shared by the tests (`common::server`) and the benches
//! (`benches/support/launch.rs`).

use std::io::{BufRead, BufReader};
use std::process::ChildStderr;
use std::sync::mpsc::Receiver;

/// Drains `stderr` on a thread of its own, handing every line to
/// `each_line`; the receiver yields the base URL of the "listening on" line.
pub fn listen_address(stderr: ChildStderr, mut each_line: impl FnMut(&str) + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // The line first, then the address: a caller that reads the log
            // as soon as it has the address finds the "listening on" line in it.
            each_line(&line);
            if let Some(addr) = line.split("listening on ").nth(1)
                && let Some(tx) = tx.take()
            {
                // Text logs end the address with a space, JSON logs with a quote.
                let _ = tx.send(addr.split(|c: char| c.is_whitespace() || c == '"').next().unwrap_or("").to_string());
            }
        }
    });
    rx
}
