//! The pure-SQLite group-commit ceiling of this disk, for `bench/relay-latency` (issue 16 item 4):
//! appends `--rows` rows of `--row-bytes` bytes each to one table, `--batch` rows per
//! transaction, with the spool's connection pragmas (`src/spool/store.rs`: WAL,
//! `synchronous = FULL`, 64 MiB cache), and prints rows/s as one JSON line. Nothing but SQLite
//! runs: no index besides the rowid, no parsing, no queue, so the bridge's durable path can be
//! stated as a fraction of what the disk allows at the same batch size; `commit_p50_us` /
//! `commit_p99_us` are each commit's own time (at `--batch 1`: the floor of a held billing reply);
//! `user_us_per_row` / `sys_us_per_row` are the process's CPU (`getrusage`) over the loop per row,
//! the least CPU any writer committing through SQLite at this batch size spends on a row here.
//! Benchmarks only.
//!
//! `cargo run --release --example sqlite_ceiling -- --path /tmp/x.db --batch 100 --rows 500000`

use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

struct Args {
    path: String,
    batch: usize,
    rows: usize,
    row_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        path: String::new(),
        batch: 100,
        rows: 500_000,
        row_bytes: 300,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--path" => args.path = value.clone(),
            "--batch" => args.batch = number()?.max(1),
            "--rows" => args.rows = number()?.max(1),
            "--row-bytes" => args.row_bytes = number()?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.path.is_empty() {
        return Err("--path is required (a new file on the disk to measure)".into());
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|e| {
        format!(
            "{e}\nusage: sqlite_ceiling --path FILE [--batch 100] [--rows 500000] [--row-bytes 300]"
        )
    })?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", args.path));
    }
    let mut conn = Connection::open(&args.path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // The spool's pragmas (src/spool/store.rs, Store::open).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.execute_batch(
        "CREATE TABLE records (id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, record TEXT NOT NULL)",
    )?;
    // A MeterValues-like JSON payload, different per row so nothing compresses or dedups.
    let filler = "x".repeat(args.row_bytes.saturating_sub(40));
    let cpu_before = cpu_times();
    let started = Instant::now();
    let mut written = 0usize;
    let mut commits = 0usize;
    // Each commit's own time: at one row per commit its median is the least a billing reply
    // held for its commit can wait on this disk.
    let mut commit_times = Vec::with_capacity(args.rows / args.batch + 1);
    while written < args.rows {
        let commit_started = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO records (received_at, record) VALUES (?1, ?2)")?;
            for _ in 0..args.batch.min(args.rows - written) {
                let record = format!("{{\"n\":{written},\"f\":\"{filler}\"}}");
                insert.execute(params![written as i64, record])?;
                written += 1;
            }
        }
        tx.commit()?;
        commits += 1;
        commit_times.push(commit_started.elapsed());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (user, sys) = cpu_times();
    let per_row_us = |after: Duration, before: Duration| {
        after.saturating_sub(before).as_secs_f64() * 1e6 / written as f64
    };
    let (user_us_per_row, sys_us_per_row) = (
        per_row_us(user, cpu_before.0),
        per_row_us(sys, cpu_before.1),
    );
    commit_times.sort_unstable();
    let quantile_us = |q: f64| {
        let index = ((commit_times.len() as f64 * q) as usize).min(commit_times.len() - 1);
        commit_times[index].as_secs_f64() * 1e6
    };
    println!(
        "{{\"rows\":{written},\"batch\":{},\"row_bytes\":{},\"commits\":{commits},\"elapsed_s\":{elapsed:.3},\"rows_per_s\":{:.0},\"commit_us\":{:.1},\"commit_p50_us\":{:.1},\"commit_p99_us\":{:.1},\"user_us_per_row\":{user_us_per_row:.2},\"sys_us_per_row\":{sys_us_per_row:.2}}}",
        args.batch,
        args.row_bytes,
        written as f64 / elapsed,
        elapsed * 1e6 / commits as f64,
        quantile_us(0.5),
        quantile_us(0.99)
    );
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", args.path));
    }
    Ok(())
}

/// This process's user and system CPU time so far.
fn cpu_times() -> (Duration, Duration) {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(
            libc::getrusage(libc::RUSAGE_SELF, &mut usage),
            0,
            "getrusage"
        );
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (time(usage.ru_utime), time(usage.ru_stime))
}
