//! Running a worker until it finishes or a signal asks it to stop.
//!
//! Guarantee: on SIGTERM or SIGINT the worker stops polling, finishes the
//! batch in hand (write, commit) and leaves the group; if that takes longer
//! than the deadline, [`run_until_signal`] returns an error instead of hanging
//! (the caller exits, and whatever was not committed is redelivered and
//! resolved as duplicates).

use crate::pipeline::{RunSummary, StopWhen, Worker};
use anyhow::{anyhow, Context as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Runs `worker` on its own thread until it stops by itself (`stop`) or a
/// signal arrives, then waits at most `deadline` for it to finish.
pub fn run_until_signal(
    worker: Worker,
    stop: StopWhen,
    deadline: Duration,
) -> anyhow::Result<RunSummary> {
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let worker_flag = flag.clone();
    std::thread::Builder::new()
        .name("idem-pipeline".into())
        .spawn(move || {
            let _ = tx.send(worker.run(worker_flag, stop));
        })
        .context("starting the pipeline thread")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut rx = rx;
        tokio::select! {
            done = &mut rx => return done.map_err(|_| anyhow!("the pipeline thread panicked"))?,
            _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in hand, committing, leaving the group"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the batch in hand, committing, leaving the group"),
        }
        flag.store(true, Ordering::SeqCst);
        match tokio::time::timeout(deadline, rx).await {
            Ok(done) => done.map_err(|_| anyhow!("the pipeline thread panicked"))?,
            Err(_) => Err(anyhow!(
                "shutdown took longer than {}s; exiting without waiting (uncommitted messages will be redelivered and resolve as duplicates)",
                deadline.as_secs()
            )),
        }
    })
}
