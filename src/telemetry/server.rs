//! The operations endpoint: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process is alive and its pipeline loop is turning) and `GET /readyz`
//! (partitions assigned, store writable, application reachable).
//!
//! Guarantee: the endpoint binds before the worker consumes anything, so a
//! port already taken is a start-up error naming the address; it binds to
//! 127.0.0.1 unless configured otherwise; its answers never contain payload
//! bytes or secrets.

use crate::handler::RemoteHandler;
use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the pipeline tells the health endpoints.
#[derive(Default)]
pub struct Health {
    assigned: AtomicBool,
    failing: Mutex<Option<String>>,
    broker: Mutex<Option<String>>,
    brokers_down: AtomicBool,
    stopping: AtomicBool,
    held_partitions: AtomicU64,
    /// Partitions held for the operator (their log was rewritten below
    /// every checkpoint kept), by "topic/partition", with the reason.
    rewritten: Mutex<std::collections::BTreeMap<String, String>>,
    /// Unix ms of the last turn of the pipeline loop.
    heartbeat_ms: AtomicU64,
    /// How long the loop may go without a turn before `/healthz` fails.
    stall_limit_ms: AtomicU64,
    /// How long the loop may go without a turn before `/readyz` fails.
    busy_limit_ms: AtomicU64,
    handler: Mutex<Option<Arc<dyn RemoteHandler>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    /// A health state for a worker whose handler calls take at most
    /// `request_timeout`: the loop counts as stuck for `/readyz` after
    /// `request_timeout` + 15 s without a turn, and as not alive for
    /// `/healthz` after 3 × `request_timeout` + 120 s.
    pub fn new(request_timeout: Duration) -> Arc<Self> {
        let h = Health::default();
        let alive = request_timeout * 3 + Duration::from_secs(120);
        let busy = request_timeout + Duration::from_secs(15);
        h.stall_limit_ms
            .store(alive.as_millis() as u64, Ordering::Relaxed);
        h.busy_limit_ms
            .store(busy.as_millis() as u64, Ordering::Relaxed);
        h.beat();
        Arc::new(h)
    }

    /// The pipeline loop turned.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the worker owns at least one partition.
    pub fn set_assigned(&self, assigned: bool) {
        self.assigned.store(assigned, Ordering::Relaxed);
    }

    /// Why the last batch could not be made durable (the store, a dead
    /// letter or a reply could not be written), or `None` once one was.
    pub fn set_failing(&self, why: Option<String>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Trouble with the brokers (commits failing), or `None` once they
    /// answer again.
    pub fn set_broker_trouble(&self, why: Option<String>) {
        let mut b = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        if why.is_none() {
            self.brokers_down.store(false, Ordering::Relaxed);
        }
        if b.is_some() || why.is_some() {
            *b = why;
        }
    }

    /// librdkafka reported every broker connection down.
    pub fn set_brokers_down(&self, why: String) {
        self.brokers_down.store(true, Ordering::Relaxed);
        *self.broker.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// True from an all-brokers-down report until the brokers answer again.
    pub fn brokers_down(&self) -> bool {
        self.brokers_down.load(Ordering::Relaxed)
    }

    /// True while some broker trouble is reported.
    pub fn broker_trouble(&self) -> bool {
        self.broker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Partitions held at a message whose retries ran out.
    pub fn set_held_partitions(&self, n: usize) {
        self.held_partitions.store(n as u64, Ordering::Relaxed);
    }

    /// A partition held for the operator because its log was rewritten
    /// (`Some` reason), or no longer (`None`: revoked).
    pub fn set_rewritten(&self, partition: String, why: Option<String>) {
        let mut r = self.rewritten.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(w) => r.insert(partition, w),
            None => r.remove(&partition),
        };
    }

    /// The worker is shutting down: not ready any more.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The remote handler whose reachability `/readyz` reports.
    pub fn set_handler(&self, handler: Arc<dyn RemoteHandler>) {
        *self.handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Why the worker is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            out.push("shutting down".to_string());
        }
        if !self.assigned.load(Ordering::Relaxed) {
            out.push("no partition assigned".to_string());
        }
        if let Some(why) = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            out.push(format!("batches cannot be made durable ({why})"));
        }
        if let Some(why) = self
            .broker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            out.push(format!("Kafka: {why}"));
        }
        out.extend(
            self.rewritten
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        let handler = self.handler.lock().unwrap_or_else(|e| e.into_inner());
        if handler.as_ref().is_some_and(|h| !h.reachable()) {
            out.push("the application did not answer the last call".to_string());
        }
        let since = now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        if since > self.busy_limit_ms.load(Ordering::Relaxed) {
            out.push(format!(
                "the pipeline loop has not turned for {since} ms (waiting on the brokers, the store or the application)"
            ));
        }
        let held = self.held_partitions.load(Ordering::Relaxed);
        if held > 0 {
            out.push(format!(
                "{held} partition(s) held at a message whose retries ran out"
            ));
        }
        out
    }

    /// Why the process counts as not alive; `None` when it is.
    pub fn stalled(&self) -> Option<String> {
        let since = now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        let limit = self.stall_limit_ms.load(Ordering::Relaxed);
        (since > limit).then(|| format!("the pipeline loop has not turned for {since} ms"))
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
}

async fn metrics_text() -> impl IntoResponse {
    match super::metrics::install() {
        Some(h) => {
            h.run_upkeep();
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                h.render(),
            )
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "another metrics recorder is installed in this process\n".to_string(),
        ),
    }
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.stalled() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let reasons = s.health.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}

/// Binds `listen` and serves the endpoints on a thread of their own until
/// the process exits; returns the bound address (useful with port 0).
pub fn serve(listen: SocketAddr, health: Arc<Health>) -> anyhow::Result<SocketAddr> {
    super::metrics::install();
    let listener = std::net::TcpListener::bind(listen).with_context(|| {
        format!("binding the metrics and health endpoint `metrics.listen` = {listen}")
    })?;
    listener
        .set_nonblocking(true)
        .context("making the metrics listener non-blocking")?;
    let bound = listener
        .local_addr()
        .context("reading the metrics listener's address")?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health });
    std::thread::Builder::new()
        .name("idem-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the metrics runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the metrics listener");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            });
        })
        .context("starting the metrics thread")?;
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}
