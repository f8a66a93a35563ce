//! The device's retry rule (issue 16 item 5): which answers of a role are worth another try,
//! how long to wait before it, and the pause a busy role asks for. One rule for `tred` and
//! for the fleet benchmark's simulated devices, so that what the benchmark shows is what
//! devices do (rust-keylime's agents retried too fast or forever: their #681 and PR #1060).

use std::time::Duration;

use tonic::{Code, Status};

/// Whether `s` says "not now" (the role is unreachable, busy or restarting) rather than "no":
/// the call may be tried again unchanged.
pub fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
    )
}

/// The pause a busy role asked for (gRPC's server pushback, `grpc-retry-pushback-ms`), at
/// most a minute.
pub fn pushback(s: &Status) -> Option<Duration> {
    let ms: u64 = s
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

/// The pause before retry `tries` (from 1): doubling from 250 ms to 5 s, each drawn at random
/// between half and all of it, and never shorter than what a busy role asked for (its
/// pushback, jittered likewise), so that a fleet refused together does not come back together.
pub fn wait(tries: u32, pushback: Option<Duration>) -> Duration {
    let ceiling = 250u64
        .saturating_mul(1 << tries.saturating_sub(1).min(5))
        .min(5_000);
    let ms = ceiling / 2 + rand::random::<u64>() % (ceiling / 2 + 1);
    let backoff = Duration::from_millis(ms);
    match pushback {
        Some(p) => {
            let p = u64::try_from(p.as_millis()).unwrap_or(u64::MAX);
            backoff.max(Duration::from_millis(
                p + rand::random::<u64>() % (p / 2 + 1),
            ))
        }
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_jitter_and_honour_the_pushback() {
        for tries in 1..10 {
            let w = wait(tries, None).as_millis() as u64;
            let ceiling = (250u64 << (tries - 1).min(5)).min(5_000);
            assert!((ceiling / 2..=ceiling).contains(&w), "{tries}: {w}");
        }
        let w = wait(1, Some(Duration::from_millis(1_000))).as_millis();
        assert!((1_000..=1_500).contains(&w), "{w}");
        let mut busy = Status::resource_exhausted("busy");
        busy.metadata_mut()
            .insert("grpc-retry-pushback-ms", "999999".parse().unwrap());
        assert_eq!(pushback(&busy), Some(Duration::from_secs(60)));
        assert!(transient(&busy));
        assert!(!transient(&Status::permission_denied("no")));
    }
}
