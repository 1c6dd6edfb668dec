//! Pure: when a paused shipper is worth a log line. A pause is logged when it starts or its
//! problem changes, then reminded at most once per [`REMIND_EVERY`] however often Lago is
//! re-probed; the end of a pause is logged once. (Probing every 5 s used to log an ERROR every
//! 5 s, which buries everything else.)

use std::time::{Duration, Instant};

/// Least time between two log lines about the same pause.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

/// What to log for one more "delivery is paused" observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseLine {
    /// The pause started, or its problem changed: log it.
    Started,
    /// The same pause, last logged at least [`REMIND_EVERY`] ago: remind.
    Reminder { paused_for: Duration },
    /// The same pause, logged recently: nothing.
    Quiet,
}

/// The pause being logged: its problem, since when, and when it was last logged.
#[derive(Debug, Default)]
pub struct PauseLog {
    current: Option<(String, Instant, Instant)>,
}

impl PauseLog {
    /// Delivery is paused for `problem` at `now`.
    pub fn paused(&mut self, problem: &str, now: Instant) -> PauseLine {
        match &mut self.current {
            Some((current, since, logged)) if current == problem => {
                if now.saturating_duration_since(*logged) >= REMIND_EVERY {
                    *logged = now;
                    PauseLine::Reminder {
                        paused_for: now.saturating_duration_since(*since),
                    }
                } else {
                    PauseLine::Quiet
                }
            }
            _ => {
                self.current = Some((problem.to_string(), now, now));
                PauseLine::Started
            }
        }
    }

    /// Delivery works at `now`: how long it was paused, if it was.
    pub fn resumed(&mut self, now: Instant) -> Option<Duration> {
        self.current
            .take()
            .map(|(_, since, _)| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_probed_every_5_s_for_3_minutes_logs_once_per_minute_and_its_end_once() {
        let t0 = Instant::now();
        let mut log = PauseLog::default();
        let mut lines = Vec::new();
        for probe in 0..36 {
            let line = log.paused("key refused", t0 + Duration::from_secs(5 * probe));
            if line != PauseLine::Quiet {
                lines.push((probe, line));
            }
        }
        assert_eq!(
            lines,
            vec![
                (0, PauseLine::Started),
                (
                    12,
                    PauseLine::Reminder {
                        paused_for: Duration::from_secs(60)
                    }
                ),
                (
                    24,
                    PauseLine::Reminder {
                        paused_for: Duration::from_secs(120)
                    }
                ),
            ]
        );
        assert_eq!(
            log.resumed(t0 + Duration::from_secs(180)),
            Some(Duration::from_secs(180))
        );
        assert_eq!(
            log.resumed(t0 + Duration::from_secs(185)),
            None,
            "ended once"
        );
    }

    #[test]
    fn a_different_problem_is_a_new_pause() {
        let t0 = Instant::now();
        let mut log = PauseLog::default();
        assert_eq!(log.paused("key refused", t0), PauseLine::Started);
        assert_eq!(
            log.paused("metric missing", t0 + Duration::from_secs(5)),
            PauseLine::Started
        );
        assert_eq!(
            log.paused("metric missing", t0 + Duration::from_secs(10)),
            PauseLine::Quiet
        );
    }
}
