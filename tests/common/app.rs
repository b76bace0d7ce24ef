//! A real HTTP application for the sidecar tests: it listens on loopback,
//! decodes each payment event it is sent, answers as its `Behaviour` says,
//! and records every call (the `Idempotency-Key` it carried, the event id in
//! the body, the status it answered). It does not dedup: it counts.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem::proto::PaymentEvent;
use prost::Message as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One call the application received.
#[derive(Debug, Clone)]
pub struct Call {
    /// The `Idempotency-Key` header.
    pub key: String,
    /// The event id decoded from the body.
    pub event_id: String,
    /// What it answered (0 for "too slow": answered after idem's timeout).
    pub status: u16,
    /// Every header of the request, lower-cased names.
    pub headers: HashMap<String, String>,
}

/// How the application answers the `attempt`-th call (1-based) for an event.
pub type Behaviour = dyn Fn(&str, usize) -> Answer + Send + Sync;

/// One answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// This status and body, with a `Retry-After` when given.
    Status(u16, String, Option<u64>),
    /// Sleep this long, then answer 503 (the caller has given up by then).
    Slow(Duration),
}

#[derive(Clone)]
struct AppState {
    calls: Arc<Mutex<Vec<Call>>>,
    behaviour: Arc<Behaviour>,
}

/// A running application.
pub struct App {
    /// Its address.
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    _runtime: tokio::runtime::Runtime,
}

fn event_id(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(id) = v.get("event_id").and_then(|v| v.as_str()) {
            return id.to_string();
        }
    }
    PaymentEvent::decode(body)
        .map(|e| e.event_id)
        .unwrap_or_else(|_| "<undecodable>".into())
}

async fn events(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let id = event_id(&body);
    let attempt = {
        let calls = s.calls.lock().unwrap();
        calls.iter().filter(|c| c.event_id == id).count() + 1
    };
    let answer = (s.behaviour)(&id, attempt);
    let status = match &answer {
        Answer::Status(code, _, _) => *code,
        Answer::Slow(_) => 0,
    };
    s.calls.lock().unwrap().push(Call {
        key,
        event_id: id,
        status,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or("<binary>").to_string(),
                )
            })
            .collect(),
    });
    match answer {
        Answer::Status(code, body, retry_after) => {
            let mut r = (StatusCode::from_u16(code).unwrap(), body).into_response();
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            r
        }
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::SERVICE_UNAVAILABLE, "slow").into_response()
        }
    }
}

impl App {
    /// Starts the application on `addr` (port 0: any free port).
    pub fn start(addr: SocketAddr, behaviour: Arc<Behaviour>) -> App {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state = AppState {
            calls: calls.clone(),
            behaviour,
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/events", post(events))
            .with_state(state);
        runtime.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        App {
            addr,
            calls,
            _runtime: runtime,
        }
    }

    /// The URL idem posts to.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

/// A loopback port that is free now (for an application started later).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET http://addr/path`: status and body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::blocking::get(format!("http://{addr}{path}")).unwrap();
    let status = r.status().as_u16();
    (status, r.text().unwrap())
}

/// The value of a Prometheus sample `name{labels}` (labels in any order,
/// all of `labels` present), 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
