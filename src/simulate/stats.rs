//! Counters and reply-latency histograms shared by all simulated chargers, and the summary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Highest latency a histogram records; slower replies are clamped to it (and counted).
const MAX_LATENCY_US: u64 = 60_000_000;
/// How many error messages are kept verbatim for the operator.
const ERROR_SAMPLES: usize = 10;

/// Which latency class an action's reply belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionClass {
    /// StartTransaction, MeterValues, StopTransaction: the bridge taps these.
    Billing,
    /// Heartbeat, StatusNotification: relayed untouched.
    NonBilling,
    /// BootNotification.
    Boot,
}

impl ActionClass {
    /// The class of a charger-initiated action.
    pub fn of(action: &str) -> ActionClass {
        match action {
            "StartTransaction" | "MeterValues" | "StopTransaction" => ActionClass::Billing,
            "BootNotification" => ActionClass::Boot,
            _ => ActionClass::NonBilling,
        }
    }
}

/// Everything counted during a run; cheap to update from many tasks.
#[derive(Debug)]
pub struct Stats {
    pub chargers_connected: AtomicU64,
    pub sessions_completed: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub central_calls_answered: AtomicU64,
    billing: Mutex<Histogram<u64>>,
    non_billing: Mutex<Histogram<u64>>,
    boot: Mutex<Histogram<u64>>,
    errors: Mutex<Errors>,
}

#[derive(Debug, Default)]
struct Errors {
    by_kind: BTreeMap<&'static str, u64>,
    samples: Vec<String>,
}

fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(
        Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
            .expect("static histogram bounds are valid"),
    )
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            chargers_connected: AtomicU64::new(0),
            sessions_completed: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            central_calls_answered: AtomicU64::new(0),
            billing: histogram(),
            non_billing: histogram(),
            boot: histogram(),
            errors: Mutex::default(),
        }
    }
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time from sending a CALL to receiving its answer.
    pub fn record_latency(&self, class: ActionClass, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let histogram = match class {
            ActionClass::Billing => &self.billing,
            ActionClass::NonBilling => &self.non_billing,
            ActionClass::Boot => &self.boot,
        };
        histogram
            .lock()
            .expect("histogram lock")
            .saturating_record(micros);
    }

    /// Counts an error of `kind`, keeping the first few messages.
    pub fn error(&self, kind: &'static str, message: String) {
        let mut errors = self.errors.lock().expect("errors lock");
        *errors.by_kind.entry(kind).or_default() += 1;
        if errors.samples.len() < ERROR_SAMPLES {
            errors.samples.push(format!("{kind}: {message}"));
        }
    }

    /// Total errors of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors
            .lock()
            .expect("errors lock")
            .by_kind
            .values()
            .sum()
    }

    /// The first error messages, for stderr.
    pub fn error_samples(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").samples.clone()
    }

    /// The run's summary as one JSON object.
    pub fn summary(&self, chargers: u64, sessions_planned: u64, elapsed: Duration) -> Value {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let latency = |histogram: &Mutex<Histogram<u64>>| {
            let h = histogram.lock().expect("histogram lock");
            json!({
                "count": h.len(),
                "p50": h.value_at_quantile(0.5),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
            })
        };
        let replies = {
            let count = |h: &Mutex<Histogram<u64>>| h.lock().expect("histogram lock").len();
            count(&self.billing) + count(&self.non_billing) + count(&self.boot)
        };
        let errors = self.errors.lock().expect("errors lock").by_kind.clone();
        let elapsed_s = elapsed.as_secs_f64();
        json!({
            "chargers": chargers,
            "chargers_connected": load(&self.chargers_connected),
            "sessions_planned": sessions_planned,
            "sessions_completed": load(&self.sessions_completed),
            "frames_sent": load(&self.frames_sent),
            "frames_received": load(&self.frames_received),
            "replies": replies,
            "central_calls_answered": load(&self.central_calls_answered),
            "elapsed_s": (elapsed_s * 1000.0).round() / 1000.0,
            "replies_per_s": if elapsed_s > 0.0 { (replies as f64 / elapsed_s).round() } else { 0.0 },
            "error_count": errors.values().sum::<u64>(),
            "errors": errors,
            "latency_us": {
                "billing": latency(&self.billing),
                "non_billing": latency(&self.non_billing),
                "boot": latency(&self.boot),
            },
        })
    }
}

/// The summary in lines a person reads.
pub fn human(summary: &Value) -> String {
    let mut out = format!(
        "chargers connected  {}/{}\nsessions completed  {}/{}\nframes sent         {}\nframes received     {}\n\
         central calls       {} answered\nelapsed             {} s ({} replies/s)\nerrors              {}\n",
        summary["chargers_connected"],
        summary["chargers"],
        summary["sessions_completed"],
        summary["sessions_planned"],
        summary["frames_sent"],
        summary["frames_received"],
        summary["central_calls_answered"],
        summary["elapsed_s"],
        summary["replies_per_s"],
        summary["error_count"],
    );
    if let Some(errors) = summary["errors"].as_object() {
        for (kind, count) in errors {
            out.push_str(&format!("  {kind:<18}{count}\n"));
        }
    }
    out.push_str("reply latency (µs)  count      p50      p99     p999      max\n");
    for class in ["non_billing", "billing", "boot"] {
        let l = |field: &str| summary["latency_us"][class][field].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "  {class:<18}{:>6} {:>8} {:>8} {:>8} {:>8}\n",
            l("count"),
            l("p50"),
            l("p99"),
            l("p999"),
            l("max")
        ));
    }
    out
}
