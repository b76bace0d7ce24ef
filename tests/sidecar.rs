//! The sidecar: idem consumes from a real broker and POSTs each new message
//! to a real HTTP application started by the test, which answers 503, times
//! out, refuses, or is down, as each test arranges. Counts are exact.

mod common;

use common::app::{self, Answer, App};
use common::*;
use idem::config::OnExhausted;
use idem::handler::http::HttpHandler;
use idem::handler::AnyHandler;
use idem::pipeline::{StopWhen, Worker};
use idem::workload::{Role, Workload, WorkloadSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::xxh3_64;

fn sidecar(config: idem::config::Config) -> Worker {
    let handler = HttpHandler::new(&config.http).unwrap();
    Worker::with_handler(
        config,
        AnyHandler::Remote(Arc::new(handler)),
        Arc::new(idem::clock::SystemClock),
    )
    .unwrap()
}

fn quick_retries(c: &mut idem::config::Config, max_attempts: u32, on_exhausted: OnExhausted) {
    c.handler = idem::config::HandlerKind::Http;
    c.retry.initial_delay_ms = 10;
    c.retry.max_delay_ms = 300;
    c.retry.max_attempts = max_attempts;
    c.retry.on_exhausted = on_exhausted;
    c.http.request_timeout_ms = 500;
    c.http.connect_timeout_ms = 500;
}

#[test]
fn a_flaky_application_gets_every_event_until_it_succeeds_once_with_the_same_key() {
    let topic = unique("sidecar-flaky");
    let group = unique("g");
    create_topic(&topic, 4);
    let w = Workload::generate(&WorkloadSpec {
        unique: 1_500,
        resends: 150,
        conflicts: 10,
        partitions: 4,
        ..WorkloadSpec::default()
    });
    w.produce(&brokers(), &topic).unwrap();
    let originals: Vec<&str> = w
        .messages
        .iter()
        .filter(|m| m.role == Role::Original)
        .map(|m| m.event.event_id.as_str())
        .collect();
    let refused_400 = originals[3].to_string();
    let refused_409 = originals[700].to_string();
    let (r400, r409) = (refused_400.clone(), refused_409.clone());
    let app = App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |id: &str, attempt: usize| {
            if id == r400 {
                return Answer::Status(400, "amount below minimum".into(), None);
            }
            if id == r409 {
                return Answer::Status(409, "account frozen".into(), None);
            }
            let h = xxh3_64(id.as_bytes());
            match (h % 40, attempt) {
                (0..=3, 1) => Answer::Status(503, "busy".into(), None),
                (4, 1) => Answer::Slow(Duration::from_millis(1500)),
                (5, 1) => Answer::Status(429, "slow down".into(), Some(0)),
                (6, 1 | 2) => Answer::Status(500, "oops".into(), None),
                _ => Answer::Status(200, "{\"status\":\"SUCCESS\"}".into(), None),
            }
        }),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, dir.path());
    quick_retries(&mut config, 10, OnExhausted::Pause);
    config.http.url = app.url();
    let worker = sidecar(config);
    let addr =
        idem::telemetry::server::serve("127.0.0.1:0".parse().unwrap(), worker.health()).unwrap();
    let summary = worker
        .run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)
        .unwrap();

    let calls = app.calls();
    // Every call carried the event's own key.
    for c in &calls {
        assert_eq!(c.key, c.event_id, "Idempotency-Key differs from the event");
        assert_eq!(c.headers.get("idem-topic"), Some(&topic));
    }
    let mut by_event: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for c in &calls {
        by_event
            .entry(c.event_id.as_str())
            .or_default()
            .push(c.status);
    }
    // Every original reached the application until it succeeded, and never
    // again after; the refused ones once each.
    assert_eq!(by_event.len(), originals.len());
    for id in &originals {
        let statuses = &by_event[id];
        let last = *statuses.last().unwrap();
        if *id == refused_400 {
            assert_eq!(statuses, &vec![400]);
        } else if *id == refused_409 {
            assert_eq!(statuses, &vec![409]);
        } else {
            assert_eq!(last, 200, "{id}: {statuses:?}");
            assert_eq!(
                statuses.iter().filter(|s| **s == 200).count(),
                1,
                "{id} handled twice: {statuses:?}"
            );
        }
    }
    let failed_calls = calls
        .iter()
        .filter(|c| ![200, 400, 409].contains(&c.status))
        .count() as u64;
    eprintln!(
        "flaky application: {} calls, {failed_calls} failed and retried; summary {summary:?}",
        calls.len()
    );
    assert!(
        failed_calls > 100,
        "the application failed only {failed_calls} calls"
    );
    assert_eq!(summary.retries, failed_calls);
    assert_eq!(summary.handled, originals.len() as u64 - 2);
    assert_eq!(summary.rejected, 2);
    assert_eq!(summary.duplicates, w.count(Role::Resend) as u64);
    assert_eq!(summary.conflicts, w.count(Role::Conflict) as u64);
    assert_eq!(summary.exhausted, 0);
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));

    // The refusals are dead-lettered with their status.
    let letters = read_all(&format!("{topic}.dlq"), 4);
    let reasons: HashMap<String, String> = letters
        .iter()
        .filter(|m| header(m, "idem-kind") == Some("rejected"))
        .map(|m| {
            let id = app_event_id(m);
            (id, header(m, "idem-reason").unwrap().to_string())
        })
        .collect();
    assert_eq!(reasons.len(), 2);
    assert_eq!(
        reasons[&refused_400],
        "handler rejected: HTTP 400: amount below minimum"
    );
    assert_eq!(
        reasons[&refused_409],
        "handler rejected: HTTP 409: account frozen"
    );

    // /metrics counts what the test counted.
    let (status, text) = app::get(addr, "/metrics");
    assert_eq!(status, 200);
    let count = |outcome: &str| {
        app::metric(
            &text,
            "idem_messages_total",
            &[("topic", &topic), ("outcome", outcome)],
        ) as u64
    };
    assert_eq!(count("handled"), summary.handled);
    assert_eq!(count("duplicate"), summary.duplicates);
    assert_eq!(count("conflict"), summary.conflicts);
    assert_eq!(count("rejected"), 2);
    assert_eq!(
        app::metric(&text, "idem_retries_total", &[("topic", &topic)]) as u64,
        failed_calls
    );
    // The latency histogram has no topic label and the other tests of this
    // binary call the same handler at the same time: a lower bound.
    let timed = app::metric(
        &text,
        "idem_handler_duration_seconds_count",
        &[("handler", "http"), ("result", "handled")],
    ) as u64;
    assert!(timed >= summary.handled, "{timed} timed calls");
    let (status, _) = app::get(addr, "/healthz");
    assert_eq!(status, 200);
}

fn app_event_id(m: &rdkafka::message::OwnedMessage) -> String {
    use prost::Message as _;
    use rdkafka::Message as _;
    let body = m.payload().unwrap_or_default();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(id) = v.get("event_id").and_then(|v| v.as_str()) {
            return id.to_string();
        }
    }
    idem::proto::PaymentEvent::decode(body).unwrap().event_id
}

#[test]
fn an_application_down_for_20_s_holds_the_partitions_and_then_gets_everything_once() {
    let topic = unique("sidecar-down");
    let group = unique("g");
    create_topic(&topic, 2);
    let w = Workload::generate(&WorkloadSpec {
        unique: 200,
        resends: 20,
        conflicts: 0,
        partitions: 2,
        ..WorkloadSpec::default()
    });
    w.produce(&brokers(), &topic).unwrap();
    let addr = app::free_port();

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, dir.path());
    quick_retries(&mut config, 3, OnExhausted::Pause);
    config.retry.max_delay_ms = 1_000;
    config.http.url = format!("http://{addr}/events");
    let worker = sidecar(config);
    let health = worker.health();
    let ops = idem::telemetry::server::serve("127.0.0.1:0".parse().unwrap(), health).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let running = std::thread::spawn(move || worker.run(flag, StopWhen::Shutdown));

    // Down: nothing is committed past the first offset of each partition.
    let down_until = Instant::now() + Duration::from_secs(20);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(committed(&group, &topic, 2), vec![0, 0]);
    let (status, body) = app::get(ops, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("held at a message whose retries ran out"),
        "{body}"
    );
    std::thread::sleep(down_until.saturating_duration_since(Instant::now()));
    assert_eq!(committed(&group, &topic, 2), vec![0, 0]);

    let app = App::start(
        addr,
        Arc::new(|_: &str, _: usize| Answer::Status(200, "ok".into(), None)),
    );
    let end = log_end(&topic, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&group, &topic, 2) != end {
        assert!(
            Instant::now() < deadline,
            "did not catch up after the application returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = app::get(ops, "/readyz");
    assert_eq!(status, 200, "{body}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let summary = running.join().unwrap().unwrap();

    let calls = app.calls();
    assert_eq!(calls.len(), 200, "every event once, from idem's side");
    let mut ids: Vec<&str> = calls.iter().map(|c| c.event_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    assert_eq!(summary.handled, 200);
    assert_eq!(summary.duplicates, 20);
    assert!(summary.retries >= 2 * 3, "retries: {}", summary.retries);
}

#[test]
fn a_duplicate_gets_the_stored_response_on_the_reply_topic_without_a_call() {
    let topic = unique("sidecar-reply");
    let replies = format!("{topic}.replies");
    let group = unique("g");
    create_topic(&topic, 1);
    let w = Workload::generate(&WorkloadSpec {
        unique: 5,
        resends: 0,
        conflicts: 0,
        partitions: 1,
        ..WorkloadSpec::default()
    });
    let mut messages = w.messages.clone();
    messages.push(w.messages[2].clone()); // a byte-identical retry of the third
    idem::workload::produce_messages(&brokers(), &topic, &messages).unwrap();
    let app = App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|id: &str, attempt: usize| {
            Answer::Status(
                201,
                format!("{{\"payment\":\"{id}\",\"attempt\":{attempt}}}"),
                None,
            )
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, dir.path());
    quick_retries(&mut config, 5, OnExhausted::Pause);
    config.http.url = app.url();
    config.http.reply_topic = replies.clone();
    let summary = sidecar(config)
        .run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)
        .unwrap();
    assert_eq!(summary.handled, 5);
    assert_eq!(summary.duplicates, 1);
    assert_eq!(summary.replies, 6);
    assert_eq!(app.calls().len(), 5);

    let out = read_all(&replies, 1);
    assert_eq!(out.len(), 6);
    use rdkafka::Message as _;
    let third = &w.messages[2].event.event_id;
    let for_third: Vec<_> = out
        .iter()
        .filter(|m| header(m, "Idempotency-Key") == Some(third.as_str()))
        .collect();
    assert_eq!(for_third.len(), 2);
    assert_eq!(header(for_third[0], "idem-replayed"), Some("false"));
    assert_eq!(header(for_third[1], "idem-replayed"), Some("true"));
    assert_eq!(header(for_third[1], "idem-status"), Some("201"));
    assert_eq!(header(for_third[1], "idem-source-offset"), Some("5"));
    assert_eq!(header(for_third[1], "idem-first-offset"), Some("2"));
    assert_eq!(for_third[0].payload(), for_third[1].payload());
    assert_eq!(
        for_third[1].payload().unwrap(),
        format!("{{\"payment\":\"{third}\",\"attempt\":1}}").as_bytes()
    );
}

#[test]
fn one_message_failing_for_ever_holds_its_partition_at_its_offset_while_the_others_finish() {
    let topic = unique("sidecar-poison");
    let group = unique("g");
    create_topic(&topic, 4);
    let w = Workload::generate(&WorkloadSpec {
        unique: 800,
        resends: 0,
        conflicts: 0,
        partitions: 4,
        ..WorkloadSpec::default()
    });
    w.produce(&brokers(), &topic).unwrap();
    // The 100th event of partition 2 fails until the test lets it through.
    let on_2: Vec<&str> = w
        .messages
        .iter()
        .filter(|m| m.partition == 2)
        .map(|m| m.event.event_id.as_str())
        .collect();
    let poison = on_2[100].to_string();
    let healed = Arc::new(AtomicBool::new(false));
    let (p, h) = (poison.clone(), healed.clone());
    let app = App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |id: &str, _: usize| {
            if id == p && !h.load(std::sync::atomic::Ordering::SeqCst) {
                Answer::Status(503, "not yet".into(), None)
            } else {
                Answer::Status(200, "ok".into(), None)
            }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, dir.path());
    quick_retries(&mut config, 4, OnExhausted::Pause);
    config.http.url = app.url();
    config.batch_size = 50;
    let worker = sidecar(config);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let running = std::thread::spawn(move || worker.run(flag, StopWhen::Shutdown));

    let end = log_end(&topic, 4);
    let mut held = end.clone();
    held[2] = 100;
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&group, &topic, 4) != held {
        assert!(
            Instant::now() < deadline,
            "committed {:?}, expected {held:?}",
            committed(&group, &topic, 4)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It stays there: a few retries later nothing has moved past it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(committed(&group, &topic, 4), held);
    let calls = app.calls();
    assert!(calls.iter().filter(|c| c.event_id == poison).count() >= 4);
    assert!(
        !calls.iter().any(|c| c.event_id == on_2[101]),
        "a message behind the held one reached the application"
    );

    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(&group, &topic, 4) != end {
        assert!(Instant::now() < deadline, "did not finish after healing");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let summary = running.join().unwrap().unwrap();
    assert_eq!(summary.handled, 800);
    let calls = app.calls();
    let ok: Vec<&str> = calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| c.event_id.as_str())
        .collect();
    assert_eq!(ok.len(), 800, "each event handled once");
    // Partition 2 reached the application in offset order.
    let order: Vec<&str> = calls
        .iter()
        .filter(|c| c.headers.get("idem-partition").map(String::as_str) == Some("2"))
        .filter(|c| c.status == 200)
        .map(|c| c.event_id.as_str())
        .collect();
    assert_eq!(order, on_2);
}
