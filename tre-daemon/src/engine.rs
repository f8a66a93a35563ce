//! The one thread that owns the TRE. A TPM context is neither `Send` nor safe to share, so
//! `tred` runs the TRE and the registry on a dedicated thread and the gRPC handlers send it
//! jobs; the jobs run one at a time, which also serialises every registry transaction.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use mcim_core::identity::DeviceIdentity;
use tokio::sync::oneshot;

use crate::registry::{Registry, RegistryError};
use crate::tre::{InitOutcome, Tre, TreError};

/// What the TRE thread holds: a TRE alone before supply-time initialisation, then the
/// registry over it.
pub enum Engine {
    /// Not initialised yet: only status and init answer.
    Fresh {
        /// the TRE
        tre: Box<dyn Tre>,
        /// where the registry will live
        state_dir: PathBuf,
    },
    /// The registry, over the TRE.
    Ready(Box<Registry>),
    /// Initialisation succeeded but the registry could not be opened; needs a restart.
    Broken(String),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Fresh { .. } => f.write_str("Engine::Fresh"),
            Engine::Ready(r) => write!(f, "Engine::Ready({r:?})"),
            Engine::Broken(w) => write!(f, "Engine::Broken({w})"),
        }
    }
}

impl Engine {
    /// Opens the registry when the TRE already holds an identity.
    pub fn new(mut tre: Box<dyn Tre>, state_dir: PathBuf) -> Result<Self, RegistryError> {
        if tre.identity()?.is_some() {
            let registry = Registry::open(&state_dir, tre)?;
            let st = registry.status();
            for finding in &st.startup {
                tracing::warn!("start-up check: {finding}");
            }
            if let Some(why) = &st.lockdown {
                tracing::error!("the TRE is in lockdown: {why}");
            }
            Ok(Engine::Ready(Box::new(registry)))
        } else {
            Ok(Engine::Fresh { tre, state_dir })
        }
    }

    /// The TRE.
    pub fn tre(&mut self) -> Result<&mut dyn Tre, RegistryError> {
        match self {
            Engine::Fresh { tre, .. } => Ok(tre.as_mut()),
            Engine::Ready(r) => Ok(r.tre()),
            Engine::Broken(w) => Err(RegistryError::EngineBroken(w.clone())),
        }
    }

    /// The registry; before initialisation, [`TreError::NotInitialised`].
    pub fn registry(&mut self) -> Result<&mut Registry, RegistryError> {
        match self {
            Engine::Ready(r) => Ok(r),
            Engine::Fresh { .. } => Err(TreError::NotInitialised.into()),
            Engine::Broken(w) => Err(RegistryError::EngineBroken(w.clone())),
        }
    }

    /// Supply-time initialisation, then the registry opens.
    pub fn init_device(&mut self, identity: &DeviceIdentity) -> Result<InitOutcome, RegistryError> {
        let out = self.tre()?.init_device(identity)?;
        if matches!(self, Engine::Fresh { .. }) {
            let prev = std::mem::replace(self, Engine::Broken("initialisation in progress".into()));
            if let Engine::Fresh { tre, state_dir } = prev {
                *self = match Registry::open(&state_dir, tre) {
                    Ok(r) => Engine::Ready(Box::new(r)),
                    Err(e) => Engine::Broken(format!("registry: {e}")),
                };
            }
        }
        Ok(out)
    }
}

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// A handle to the TRE thread; cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    busy: Arc<Busy>,
}

/// How long the TRE thread has spent running jobs since the daemon started: the TRE's own
/// work (TPM commands through the TSS, token calls) with the registry commits that go with
/// it. What provisioning costs in the TRE, as opposed to the network (BENCHMARKS.md).
#[derive(Debug, Default)]
struct Busy {
    nanos: AtomicU64,
    jobs: AtomicU64,
}

/// The TRE thread's time so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreTime {
    /// Time spent running jobs, in microseconds.
    pub busy_micros: u64,
    /// Jobs run.
    pub jobs: u64,
}

/// The TRE thread is gone (it failed or the daemon is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the TRE thread is not running")]
pub struct EngineGone;

impl EngineHandle {
    /// Starts the TRE thread; `make` runs on it and builds the engine.
    pub fn spawn(
        make: impl FnOnce() -> Result<Engine, String> + Send + 'static,
    ) -> Result<(Self, std::thread::JoinHandle<()>), String> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let busy = Arc::new(Busy::default());
        let counted = busy.clone();
        let thread = std::thread::Builder::new()
            .name("tre".into())
            .spawn(move || {
                let mut engine = match make() {
                    Ok(e) => {
                        let _ = ready_tx.send(Ok(()));
                        e
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    let started = Instant::now();
                    job(&mut engine);
                    let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    counted.nanos.fetch_add(took, Ordering::Relaxed);
                    counted.jobs.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| e.to_string())?;
        ready_rx
            .recv()
            .map_err(|_| "the TRE thread died while starting".to_string())??;
        Ok((Self { tx, busy }, thread))
    }

    /// Signing with the TRE's TLS key on the TRE thread, for a rustls client key
    /// ([`crate::tls::TreTlsKey`]): the device's TLS identity is its TRE key.
    pub fn tls_signer(&self) -> Arc<crate::tls::TreSignFn> {
        let engine = self.clone();
        Arc::new(move |m: &[u8]| {
            let m = m.to_vec();
            engine
                .call_blocking(move |e| {
                    e.tre()
                        .map_err(|x| TreError::Unavailable {
                            target: "the TRE".into(),
                            detail: x.to_string(),
                        })?
                        .tls_sign(&m)
                })
                .map_err(|_| TreError::Unavailable {
                    target: "the TRE thread".into(),
                    detail: EngineGone.to_string(),
                })?
        })
    }

    /// The TRE thread's time so far.
    pub fn tre_time(&self) -> TreTime {
        TreTime {
            busy_micros: self.busy.nanos.load(Ordering::Relaxed) / 1000,
            jobs: self.busy.jobs.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the TRE thread and blocks this thread until it answers (for synchronous
    /// callers such as a TLS handshake's signature).
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Box::new(move |e| {
                let _ = tx.send(f(e));
            }))
            .map_err(|_| EngineGone)?;
        rx.recv().map_err(|_| EngineGone)
    }

    /// Runs `f` on the TRE thread and waits for its answer.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |e| {
                let _ = tx.send(f(e));
            }))
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }
}
