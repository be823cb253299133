//! Percentiles over samples, and a small table printer.
#![allow(dead_code)]

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
    pub min: Duration,
}

pub fn summarize(samples: &mut [Duration]) -> Summary {
    assert!(!samples.is_empty());
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Summary { n: samples.len(), p50: at(0.50), p99: at(0.99), mean: total / samples.len() as u32, min: samples[0] }
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A bench setting from the environment variable `name`, or `default`
/// when it is unset or does not parse.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Iterations from the environment (`BENCH_ITERS`), or `default`.
pub fn iters(default: usize) -> usize {
    setting("BENCH_ITERS", default)
}

/// The machine, printed at the top of every run.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!("{cpus} cpus, {model}; loadavg {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}
