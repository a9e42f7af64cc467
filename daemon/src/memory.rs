//! The daemon's memory, as Prometheus gauges: what the process holds in RAM, and what of it the
//! allocator hands out. The binary allocates through jemalloc, which gives freed memory back to
//! the system after a few seconds; the gauges show it.
//!
//! ```text
//!  /proc/self/status VmRSS ───────► bitclone9_process_resident_memory_bytes
//!  jemalloc stats (every 10 s) ──► bitclone9_memory_allocated_bytes   (all live allocations)
//!                               └► bitclone9_memory_allocator_resident_bytes (the allocator's pages in RAM)
//! ```
//!
//! Allocated far below resident for long is fragmentation; allocated growing run after run is a
//! leak. The C libraries (librdkafka, RocksDB) allocate through jemalloc too, so they count in
//! both.

use std::time::Duration;

/// How often the gauges are read.
const INTERVAL: Duration = Duration::from_secs(10);

/// The process's resident memory in bytes, from `/proc/self/status` (None where there is none).
pub fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Reads the gauges now.
pub fn record() {
    if let Some(rss) = process_resident_bytes() {
        metrics::gauge!("bitclone9_process_resident_memory_bytes").set(rss as f64);
    }
    // jemalloc's statistics are a snapshot refreshed by advancing its epoch.
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return;
    }
    if let Ok(allocated) = tikv_jemalloc_ctl::stats::allocated::read() {
        metrics::gauge!("bitclone9_memory_allocated_bytes").set(allocated as f64);
    }
    if let Ok(resident) = tikv_jemalloc_ctl::stats::resident::read() {
        metrics::gauge!("bitclone9_memory_allocator_resident_bytes").set(resident as f64);
    }
}

/// Keeps the gauges current while the daemon runs.
pub fn spawn_gauges() {
    tokio::spawn(async {
        loop {
            record();
            tokio::time::sleep(INTERVAL).await;
        }
    });
}
