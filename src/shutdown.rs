//! Running a worker until it finishes or a signal asks it to stop, and
//! starting it again when its store failed and can be reopened.
//!
//! Guarantees:
//! - On SIGTERM or SIGINT the worker stops polling, finishes the batch in
//!   hand (write, commit) and leaves the group; if that takes longer than the
//!   deadline, [`run_until_signal`] returns an error instead of hanging (the
//!   caller exits, and whatever was not committed is redelivered and resolved
//!   as duplicates).
//! - The signal handlers are installed once per process ([`Signals`]), so a
//!   signal that arrives between two runs (while the store is being reopened)
//!   is not lost.

use crate::pipeline::{RunSummary, StopWhen, Worker};
use anyhow::{anyhow, Context as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// SIGTERM and SIGINT, caught once for the whole process.
#[derive(Clone)]
pub struct Signals {
    flag: Arc<AtomicBool>,
    at: Arc<(Mutex<Option<Instant>>, Condvar)>,
}

impl Signals {
    /// Installs the handlers on a thread of their own.
    pub fn install() -> anyhow::Result<Signals> {
        let s = Signals {
            flag: Arc::new(AtomicBool::new(false)),
            at: Arc::new((Mutex::new(None), Condvar::new())),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the signal runtime")?;
        let mut term = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            })
            .context("installing the SIGTERM handler")?;
        let me = s.clone();
        std::thread::Builder::new()
            .name("idem-signals".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in hand, committing, leaving the group"),
                            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the batch in hand, committing, leaving the group"),
                        }
                        me.raise();
                    }
                })
            })
            .context("starting the signal thread")?;
        Ok(s)
    }

    /// Signals without a handler (for embedding and tests): call
    /// [`Signals::raise`] to stop.
    pub fn manual() -> Signals {
        Signals {
            flag: Arc::new(AtomicBool::new(false)),
            at: Arc::new((Mutex::new(None), Condvar::new())),
        }
    }

    /// Asks everything waiting on these signals to stop.
    pub fn raise(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let (lock, cv) = &*self.at;
        let mut at = lock.lock().unwrap_or_else(|e| e.into_inner());
        at.get_or_insert_with(Instant::now);
        cv.notify_all();
    }

    /// The flag a worker's loop watches.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// When the first signal arrived.
    pub fn raised_at(&self) -> Option<Instant> {
        *self.at.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps `d` or until a signal; true when a signal arrived.
    pub fn sleep(&self, d: Duration) -> bool {
        let (lock, cv) = &*self.at;
        let at = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (at, _) = cv
            .wait_timeout_while(at, d, |at| at.is_none())
            .unwrap_or_else(|e| e.into_inner());
        at.is_some()
    }
}

/// Runs `worker` on its own thread until it stops by itself (`stop`) or a
/// signal arrives, then waits at most `deadline` for it to finish.
pub fn run_until_signal(
    worker: Worker,
    stop: StopWhen,
    deadline: Duration,
    signals: &Signals,
) -> anyhow::Result<RunSummary> {
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = signals.flag();
    std::thread::Builder::new()
        .name("idem-pipeline".into())
        .spawn(move || {
            let _ = tx.send(worker.run(flag, stop));
        })
        .context("starting the pipeline thread")?;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(done) => return done,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(anyhow!("the pipeline thread panicked"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if signals
            .raised_at()
            .is_some_and(|at| at.elapsed() > deadline)
        {
            return Err(anyhow!(
                "shutdown took longer than {}s; exiting without waiting (uncommitted messages will be redelivered and resolve as duplicates)",
                deadline.as_secs()
            ));
        }
    }
}
