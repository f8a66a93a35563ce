//! Overload (issue 16 item 5): past `max_calls` calls in flight from devices and subscribers,
//! a role answers at once with RESOURCE_EXHAUSTED and a retry hint, instead of queueing the
//! call until the caller's deadline passes. The hint is gRPC's own server pushback
//! (`grpc-retry-pushback-ms`, gRPC A6), jittered so that a fleet told to wait does not come
//! back in step. A refused call never reached its handler: retrying it is always safe.
//!
//! Calls between roles (an SHO asking the PVA, the RO asking an SHO) are not shed: they are
//! few, each serves a device's call already admitted, and refusing them would fail work half
//! done. A long-lived stream (the RO's task stream) holds its slot only until its headers go
//! out. One caller (a device or subscriber certificate) holds at most a quarter of the slots,
//! and no call holds one longer than 30 s (found by an outside attack: calls opened and never
//! sent held every slot).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;

use crate::gate::Authorized;
use mcim_pki::Role;

/// The pushback's floor and spread, in milliseconds: a refused caller waits 100-400 ms, more
/// the longer the queue of refusals it is in.
const PUSHBACK_MS: (u64, u64) = (100, 300);

/// The longest a device's or subscriber's call may hold its slot (a caller that opens a call
/// and never sends its request would hold it for ever); past it the call ends with
/// DEADLINE_EXCEEDED and the slot is free.
const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The layer: at most `max_calls` device and subscriber calls in flight, and at most a
/// quarter of them (one at least) from any one caller, so that one device or subscriber
/// cannot take every slot.
#[derive(Clone, Debug)]
pub struct Shed {
    slots: Arc<Semaphore>,
    max_calls: usize,
    per_caller: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    per_caller_max: usize,
}

impl Shed {
    /// At most `max_calls` (at least 1) calls from devices and subscribers at once.
    pub fn new(max_calls: usize) -> Self {
        let max_calls = max_calls.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            per_caller: Default::default(),
            per_caller_max: (max_calls / 4).max(1),
        }
    }

    /// A call of `caller` counted, or `None` when the caller holds its share already.
    fn enter(&self, caller: String) -> Option<CallerSlot> {
        let mut m = self.per_caller.lock().ok()?;
        let n = m.entry(caller.clone()).or_insert(0);
        if *n >= self.per_caller_max {
            return None;
        }
        *n += 1;
        Some(CallerSlot {
            caller,
            map: self.per_caller.clone(),
        })
    }
}

/// One call of a caller, given back when dropped.
struct CallerSlot {
    caller: String,
    map: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            give_back(&mut m, &self.caller);
        }
    }
}

impl<S> tower::Layer<S> for Shed {
    type Service = ShedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            shed: self.clone(),
        }
    }
}

/// The service [`Shed`] makes.
#[derive(Clone, Debug)]
pub struct ShedService<S> {
    inner: S,
    shed: Shed,
}

/// The answer to a shed call: trailers-only RESOURCE_EXHAUSTED with the pushback.
fn refusal<RB: Default>(max_calls: usize) -> http::Response<RB> {
    told_to_retry(|ms| {
        tonic::Status::resource_exhausted(format!(
            "overloaded: {max_calls} calls in flight; retry after {ms} ms"
        ))
    })
}

/// A refusal before any handler: trailers-only, the status `status` makes of the pause in
/// milliseconds, with gRPC's retry pushback (`grpc-retry-pushback-ms`), jittered over
/// [`PUSHBACK_MS`].
pub(crate) fn told_to_retry<RB: Default>(
    status: impl FnOnce(u64) -> tonic::Status,
) -> http::Response<RB> {
    let ms = PUSHBACK_MS.0 + rand::random::<u64>() % (PUSHBACK_MS.1 + 1);
    let mut r = status(ms).into_http();
    r.headers_mut()
        .insert("grpc-retry-pushback-ms", http::HeaderValue::from(ms));
    r
}

/// The answer to a call that held its slot past [`HOLD_MAX`]: DEADLINE_EXCEEDED.
fn too_slow<RB: Default>() -> http::Response<RB> {
    tonic::Status::deadline_exceeded("the call took longer than the role allows").into_http()
}

impl<S, B, RB> tower::Service<http::Request<B>> for ShedService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let caller = req
            .extensions()
            .get::<Authorized>()
            .filter(|a| matches!(a.caller.role, Role::Device | Role::Subscriber))
            .map(|a| format!("{}:{}", a.caller.role, a.caller.name));
        let Some(caller) = caller else {
            return Box::pin(self.inner.call(req));
        };
        let max = self.shed.max_calls;
        let Some(mine) = self.shed.enter(caller) else {
            return Box::pin(async move { Ok(refusal(max)) });
        };
        let Ok(slot) = self.shed.slots.clone().try_acquire_owned() else {
            return Box::pin(async move { Ok(refusal(max)) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = tokio::time::timeout(HOLD_MAX, fut).await;
            drop((slot, mine));
            match r {
                Ok(r) => r,
                Err(_) => Ok(too_slow()),
            }
        })
    }
}

/// Gives back one of `key`'s places in a count of places held per key (a caller's calls here,
/// a peer's connections and a source's handshakes in [`crate::tls`]); a key holding none is
/// forgotten, so that the map holds only the keys in use.
pub(crate) fn give_back<K: std::hash::Hash + Eq>(
    counts: &mut std::collections::HashMap<K, usize>,
    key: &K,
) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_holds_a_quarter_of_the_slots_and_gives_them_back() {
        let s = Shed::new(8);
        let a: Vec<_> = (0..2).filter_map(|_| s.enter("device:a".into())).collect();
        assert_eq!(a.len(), 2);
        assert!(
            s.enter("device:a".into()).is_none(),
            "a third for one caller"
        );
        assert!(
            s.enter("device:b".into()).is_some(),
            "another caller is served"
        );
        drop(a);
        assert!(s.enter("device:a".into()).is_some(), "given back");
        assert_eq!(Shed::new(1).per_caller_max, 1);
    }
}
