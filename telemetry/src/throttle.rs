//! Warnings at a bounded rate: a flood (of refused connections, of retries against a role
//! that is down) must not fill the log. What is not said is counted and given to the next
//! warning.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one warning through at most every `every`; in between, [`Throttle::due`] counts what it
/// held back (to be logged at debug level by the caller).
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttle {
    /// A throttle that lets the first warning through, then one per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// Whether a warning is due now: `Some(n)`, with the `n` held back since the last one
    /// (and the time starts again), or `None` (counted as held back).
    pub fn due(&self) -> Option<u64> {
        let now = Instant::now();
        let due = match self.last.lock() {
            Ok(mut last) => {
                let due = last.is_none_or(|t| now.duration_since(t) >= self.every);
                if due {
                    *last = Some(now);
                }
                due
            }
            Err(_) => false,
        };
        if due {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first is due, the next ones within the period are held back and counted, the one
    /// after the period is due with that count.
    #[test]
    fn one_warning_per_period_with_the_count_held_back() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.due(), Some(0));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.due(), Some(2));
        assert_eq!(t.due(), None);
    }
}
