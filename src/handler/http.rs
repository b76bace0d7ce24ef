//! The sidecar handler: POST each new message to the application beside idem.
//!
//! The request: the payload as the body; `Idempotency-Key` (the same on
//! every retry and redelivery, so the application can finish the job end to
//! end: DESIGN.md invariant 6); `Content-Type`; `Idem-Topic`,
//! `Idem-Partition`, `Idem-Offset`, `Idem-Timestamp` (Unix ms, when the
//! message has one) and `Idem-Key-Source`; `Idem-Fencing-Token` (with the
//! changelog on: higher for every later owner of the partition, so the
//! application can refuse a worker that lost it); and every Kafka header of the
//! message as `<header_prefix><name>` (a value that is not a valid HTTP
//! header value is sent base64-encoded as `<header_prefix>B64-<name>`).
//!
//! The answer:
//! - 2xx: handled. A JSON body `{"status": "RETRY" | "DROP" | "SUCCESS"}`
//!   overrides, as Dapr applications answer: RETRY is retried, DROP is
//!   rejected (dead-lettered); any other status is retried (never taken for
//!   a success).
//! - 408, 425, 429, 5xx, 1xx and 3xx (redirects are not followed: a POST must
//!   not turn into a GET), connection errors and timeouts: retried, after at
//!   least a `Retry-After` when one is given.
//! - any other 4xx: rejected, dead-lettered with the status and the start of
//!   the body.

use crate::config::{HttpConfig, CONTENT_TYPE_AUTO};
use crate::handler::{Answer, Delivery, RemoteHandler, Response, Verdict};
use crate::key::KeySource;
use crate::payload::Decoded;
use anyhow::Context as _;
use base64::Engine as _;
use reqwest::blocking::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// The most of a response body that is read (and digested); the rest is
/// ignored and the stored body marked truncated.
const MAX_BODY: u64 = 16 << 20;
/// The most of a body quoted in a rejection reason.
const REASON_BODY: usize = 200;

/// The HTTP handler.
pub struct HttpHandler {
    client: Client,
    url: String,
    content_type: Option<HeaderValue>,
    header_prefix: String,
    request_timeout: Duration,
    reachable: AtomicBool,
}

impl HttpHandler {
    /// A handler for `[http]`, with its connection pool.
    pub fn new(config: &HttpConfig) -> anyhow::Result<Self> {
        let client = Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
            .pool_max_idle_per_host(config.pool_max_idle)
            .tcp_keepalive(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client of `[http]`")?;
        let content_type = if config.content_type == CONTENT_TYPE_AUTO {
            None
        } else {
            Some(
                HeaderValue::from_str(&config.content_type).with_context(|| {
                    format!(
                        "`http.content_type` {:?} is not a valid header value",
                        config.content_type
                    )
                })?,
            )
        };
        Ok(Self {
            client,
            url: config.url.clone(),
            content_type,
            header_prefix: config.header_prefix.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            reachable: AtomicBool::new(true),
        })
    }

    fn request_headers(&self, d: &Delivery<'_>) -> Result<HeaderMap, String> {
        let mut h = HeaderMap::new();
        let key = HeaderValue::from_bytes(&d.key.0).map_err(|_| {
            "the idempotency key holds bytes that an HTTP header cannot carry (control characters or a line break)".to_string()
        })?;
        h.insert("idempotency-key", key);
        let content_type = self.content_type.clone().unwrap_or_else(|| {
            HeaderValue::from_static(match d.decoded {
                Decoded::Json(_) => "application/json",
                Decoded::Proto(_) => "application/x-protobuf",
                Decoded::Opaque => "application/octet-stream",
            })
        });
        h.insert(CONTENT_TYPE, content_type);
        let fixed = [
            ("idem-topic", d.topic.to_string()),
            ("idem-partition", d.partition.to_string()),
            ("idem-offset", d.offset.to_string()),
            (
                "idem-key-source",
                match d.key_source {
                    KeySource::Header => "header",
                    KeySource::PayloadField => "field",
                    KeySource::Composite => "composite",
                    KeySource::Unkeyed => "offset",
                }
                .to_string(),
            ),
        ];
        for (k, v) in fixed {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
        if let Some(ts) = d.timestamp_ms {
            h.insert("idem-timestamp", HeaderValue::from(ts));
        }
        if let Some(token) = d.fencing_token {
            h.insert("idem-fencing-token", HeaderValue::from(token));
        }
        for (key, value) in crate::kafka::raw_headers(d.headers) {
            let Some(value) = value else { continue };
            // A name that is not UTF-8 keeps U+FFFD, which no HTTP header
            // name holds: it is not forwarded.
            let key = String::from_utf8_lossy(key);
            let plain = format!("{}{}", self.header_prefix, key);
            let (name, value) = match (
                HeaderName::from_bytes(plain.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                (Ok(n), Ok(v)) => (n, v),
                _ => {
                    let encoded = format!("{}B64-{}", self.header_prefix, key);
                    let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(encoded.as_bytes()),
                        HeaderValue::from_str(
                            &base64::engine::general_purpose::STANDARD.encode(value),
                        ),
                    ) else {
                        tracing::debug!(
                            header = %key.escape_debug(),
                            "a Kafka header name that is not an HTTP header name is not forwarded"
                        );
                        continue;
                    };
                    (n, v)
                }
            };
            h.append(name, value);
        }
        Ok(h)
    }
}

impl RemoteHandler for HttpHandler {
    fn name(&self) -> &'static str {
        "http"
    }

    fn call(&self, d: &Delivery<'_>) -> Answer {
        let headers = match self.request_headers(d) {
            Ok(h) => h,
            Err(reason) => {
                return Answer {
                    verdict: Verdict::Rejected(reason),
                    response: None,
                }
            }
        };
        let began = std::time::Instant::now();
        let sent = self
            .client
            .post(&self.url)
            .headers(headers)
            .body(d.payload.to_vec())
            .send();
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.reachable.store(false, Ordering::Relaxed);
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                return Answer {
                    verdict: Verdict::Retry {
                        reason: format!("POST {} {what}: {}", self.url, error_chain(&e)),
                        after: None,
                    },
                    response: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The whole response must arrive within the request timeout, also a
        // body that trickles in.
        let mut body = Vec::new();
        let mut resp = resp.take(MAX_BODY + 1);
        let mut chunk = vec![0u8; 64 << 10];
        let read: Result<(), String> = loop {
            if began.elapsed() > self.request_timeout {
                break Err(format!(
                    "the response body took longer than request_timeout_ms ({} ms)",
                    self.request_timeout.as_millis()
                ));
            }
            match resp.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(error_chain(&e)),
            }
        };
        if let Err(e) = read {
            self.reachable.store(false, Ordering::Relaxed);
            return Answer {
                verdict: Verdict::Retry {
                    reason: format!(
                        "reading the response of POST {} (HTTP {status}) failed: {e}",
                        self.url
                    ),
                    after: retry_after,
                },
                response: None,
            };
        }
        self.reachable.store(true, Ordering::Relaxed);
        let truncated = body.len() as u64 > MAX_BODY;
        body.truncate(MAX_BODY as usize);
        let response = Response {
            status,
            body,
            truncated,
            content_type,
        };
        Answer {
            verdict: classify(&response, retry_after),
            response: Some(response),
        }
    }

    fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The start of a body, as text fit for a log line and a header.
fn quote(body: &[u8]) -> String {
    let cut = &body[..body.len().min(REASON_BODY)];
    let text: String = String::from_utf8_lossy(cut)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else if body.len() > REASON_BODY {
        format!(": {text}…")
    } else {
        format!(": {text}")
    }
}

/// The verdict of a response (see the module documentation).
pub fn classify(r: &Response, retry_after: Option<Duration>) -> Verdict {
    let s = r.status;
    match s {
        200..=299 => match dapr_status(&r.body).as_deref() {
            Some("RETRY") => Verdict::Retry {
                reason: format!("HTTP {s} with status RETRY"),
                after: retry_after,
            },
            Some("DROP") => Verdict::Rejected(format!("HTTP {s}: the application answered DROP")),
            Some("SUCCESS") | None => Verdict::Handled,
            // An answer idem does not understand is not a success: for
            // payments, try again (and hold the partition) rather than skip.
            Some(other) => Verdict::Retry {
                reason: format!(
                    "HTTP {s} with status {other:?}, which is not SUCCESS, RETRY or DROP"
                ),
                after: retry_after,
            },
        },
        408 | 425 | 429 | 500..=599 => Verdict::Retry {
            reason: format!("HTTP {s}{}", quote(&r.body)),
            after: retry_after,
        },
        400..=499 => Verdict::Rejected(format!("HTTP {s}{}", quote(&r.body))),
        _ => Verdict::Retry {
            reason: format!(
                "HTTP {s}: not a final answer (redirects are not followed; check `http.url`)"
            ),
            after: retry_after,
        },
    }
}

/// The `status` of a Dapr-style JSON body, upper-cased (a status that is
/// not a string is returned as its JSON text).
fn dapr_status(body: &[u8]) -> Option<String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match v.get("status")? {
        serde_json::Value::String(s) => Some(s.to_ascii_uppercase()),
        other => Some(other.to_string()),
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> Response {
        Response {
            status,
            body: body.as_bytes().to_vec(),
            truncated: false,
            content_type: None,
        }
    }

    #[test]
    fn statuses_map_to_verdicts() {
        assert_eq!(classify(&resp(200, ""), None), Verdict::Handled);
        assert_eq!(classify(&resp(204, ""), None), Verdict::Handled);
        assert_eq!(
            classify(&resp(400, "bad amount"), None),
            Verdict::Rejected("HTTP 400: bad amount".into())
        );
        assert_eq!(
            classify(&resp(409, ""), None),
            Verdict::Rejected("HTTP 409".into())
        );
        for s in [408, 425, 429, 500, 502, 503, 504, 301, 302, 100] {
            assert!(
                matches!(classify(&resp(s, ""), None), Verdict::Retry { .. }),
                "{s}"
            );
        }
        let after = Some(Duration::from_secs(3));
        assert_eq!(
            classify(&resp(503, "busy"), after),
            Verdict::Retry {
                reason: "HTTP 503: busy".into(),
                after
            }
        );
    }

    #[test]
    fn a_dapr_status_body_overrides_a_2xx() {
        assert!(matches!(
            classify(&resp(200, r#"{"status": "RETRY"}"#), None),
            Verdict::Retry { .. }
        ));
        assert_eq!(
            classify(&resp(200, r#" {"status":"drop"}"#), None),
            Verdict::Rejected("HTTP 200: the application answered DROP".into())
        );
        assert_eq!(
            classify(&resp(200, r#"{"status":"SUCCESS"}"#), None),
            Verdict::Handled
        );
        for unknown in [r#"{"status": 3}"#, r#"{"status": "PENDING"}"#] {
            assert!(
                matches!(classify(&resp(200, unknown), None), Verdict::Retry { .. }),
                "{unknown}"
            );
        }
        assert_eq!(
            classify(&resp(200, r#"{"other": 1}"#), None),
            Verdict::Handled
        );
        assert_eq!(classify(&resp(200, "RETRY"), None), Verdict::Handled);
        // A 4xx stays a rejection whatever its body says.
        assert!(matches!(
            classify(&resp(400, r#"{"status":"RETRY"}"#), None),
            Verdict::Rejected(_)
        ));
    }

    #[test]
    fn long_or_binary_bodies_are_quoted_short_and_on_one_line() {
        let long = "x".repeat(1000);
        let Verdict::Rejected(reason) = classify(&resp(422, &long), None) else {
            panic!("not rejected")
        };
        assert_eq!(reason.chars().count(), "HTTP 422: ".len() + REASON_BODY + 1);
        let Verdict::Rejected(reason) = classify(&resp(400, "a\nb\r\0c"), None) else {
            panic!("not rejected")
        };
        assert_eq!(reason, "HTTP 400: a b  c");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
