//! Kafka client settings and topic set-up shared by the worker, the
//! dead-letter producer and the demo.
//!
//! Guarantee: every consumer idem builds has auto-commit and automatic offset
//! storing off, so no offset reaches Kafka except through the pipeline's
//! commit-after-durable-write path.

use crate::config::Config;
use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::message::OwnedHeaders;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// How long a dead letter or reply may wait for the brokers' acknowledgement
/// unless `[kafka] "message.timeout.ms"` says otherwise.
pub const DELIVERY_TIMEOUT_MS: &str = "15000";

/// Timeout of metadata and admin requests at start-up.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A client configuration with the brokers and the `[kafka]` passthrough
/// (secrets read in from the environment or files).
pub fn base_config(config: &Config) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("client.id", "idem");
    for (k, v) in config.kafka_properties()? {
        c.set(k, v);
    }
    Ok(c)
}

/// Whether a `[kafka]` property holds a secret whose value must never be
/// shown: a password or key, or a value read from the environment or a file.
fn is_secret(key: &str, raw: Option<&toml::Value>) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|w| k.contains(w))
        || raw
            .and_then(toml::Value::as_str)
            .is_some_and(|v| v.starts_with("${"))
}

/// Checks every `[kafka]` property with librdkafka itself, so that a
/// misspelt property or a bad value is a start-up error naming the
/// property; the value of a secret is never part of the message.
pub fn check_properties(config: &Config) -> anyhow::Result<()> {
    for (key, value) in config.kafka_properties()? {
        let mut c = ClientConfig::new();
        c.set(&key, &value);
        if let Err(e) = c.create_native_config() {
            let text = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
                other => other.to_string(),
            };
            let text = if is_secret(&key, config.kafka.get(&key)) && !value.is_empty() {
                text.replace(&value, "<secret>")
            } else {
                text
            };
            bail!("`kafka.\"{key}\"` is refused by librdkafka: {text}");
        }
    }
    Ok(())
}

/// The consumer configuration of the worker's group.
pub fn consumer_config(config: &Config) -> anyhow::Result<ClientConfig> {
    let mut c = base_config(config)?;
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.auto_offset_reset)
        .set("enable.partition.eof", "false");
    Ok(c)
}

/// The configuration of a consumer of idem's own that reads partitions by
/// assignment, outside the worker's group (`group` names it in the
/// brokers' view), and never commits or stores an offset.
pub fn reader_config(mut base: ClientConfig, group: &str) -> ClientConfig {
    base.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    base
}

/// The configuration of the dead-letter producer: idempotent, acks from all
/// in-sync replicas, so an acknowledged dead letter is durable.
pub fn producer_config(config: &Config) -> anyhow::Result<ClientConfig> {
    let mut c = base_config(config)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    // A dead letter or reply that the brokers do not take within this fails
    // its batch (which then waits and is retried, fail closed) instead of
    // holding the loop for librdkafka's default of five minutes.
    if !config.kafka.contains_key("message.timeout.ms") {
        c.set("message.timeout.ms", DELIVERY_TIMEOUT_MS);
    }
    Ok(c)
}

/// Queues `record` on `producer`, waiting while librdkafka's queue is full
/// (the brokers are slower than the batch); any other refusal is returned.
pub fn queue<'a>(
    producer: &rdkafka::producer::FutureProducer,
    mut record: rdkafka::producer::FutureRecord<'a, [u8], [u8]>,
) -> rdkafka::error::KafkaResult<rdkafka::producer::DeliveryFuture> {
    use rdkafka::error::KafkaError;
    loop {
        match producer.send_result(record) {
            Ok(fut) => return Ok(fut),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// An idempotent producer that is built again when librdkafka reports that
/// it failed for good (a fatal error, such as an out-of-order sequence after
/// a broker lost acknowledged messages): such a producer refuses every later
/// record, which would hold every batch that needs it for ever. A record
/// sent by the old producer and not acknowledged is sent again by its
/// batch's retry, so nothing is lost; one may be written twice.
pub struct RenewingProducer {
    config: ClientConfig,
    what: &'static str,
    current: std::sync::RwLock<rdkafka::producer::FutureProducer>,
}

impl RenewingProducer {
    /// Builds the producer (`what` names it in errors and logs).
    pub fn new(config: ClientConfig, what: &'static str) -> anyhow::Result<Self> {
        let producer = config
            .create()
            .with_context(|| format!("creating the {what} producer"))?;
        Ok(Self {
            config,
            what,
            current: std::sync::RwLock::new(producer),
        })
    }

    /// The producer to send with now.
    pub fn get(&self) -> rdkafka::producer::FutureProducer {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a failed send: when the producer failed for good, a new one
    /// takes its place for the next try.
    pub fn renew_if_failed(&self) {
        use rdkafka::producer::Producer as _;
        let Some((code, reason)) = self.get().client().fatal_error() else {
            return;
        };
        tracing::error!(producer = self.what, %code, %reason,
            "the producer failed for good; building a new one (the batch is retried with it)");
        match self.config.create() {
            Ok(p) => *self.current.write().unwrap_or_else(|e| e.into_inner()) = p,
            Err(e) => {
                tracing::error!(producer = self.what, error = %e, "cannot build a new producer; will try again")
            }
        }
    }
}

/// Number of partitions of `topic`, from broker metadata.
pub fn partition_count<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<usize> {
    let md = consumer
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .with_context(|| {
            format!(
                "fetching metadata of topic {topic} (are the brokers of `brokers` / --brokers reachable?)"
            )
        })?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("topic {topic} is not in the metadata answer"))?;
    if let Some(err) = t.error() {
        bail!("topic {topic}: {:?}", RDKafkaErrorCode::from(err));
    }
    Ok(t.partitions().len())
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub fn ensure_topic<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &Config,
    topic: &str,
    partitions: usize,
) -> anyhow::Result<()> {
    ensure_topic_with(consumer, config, topic, partitions, &[]).map(|_| ())
}

/// Creates `topic` with `partitions` partitions and the topic `settings`
/// unless it exists; its partition count either way.
pub fn ensure_topic_with<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &Config,
    topic: &str,
    partitions: usize,
    settings: &[(&str, String)],
) -> anyhow::Result<usize> {
    if let Some(n) = partition_count(consumer, topic).ok().filter(|n| *n > 0) {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> = base_config(config)?
        .create()
        .context("creating the Kafka admin client")?;
    let mut new = NewTopic::new(topic, partitions.max(1) as i32, TopicReplication::Fixed(1));
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = futures::executor::block_on(admin.create_topics([&new], &opts))
        .with_context(|| format!("creating topic {topic}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(partitions.max(1))
}

/// Commits `offsets` asynchronously so that the brokers' answer reaches the
/// consumer context's `commit_callback` on a later poll, success or failure.
/// rust-rdkafka 0.39's `commit(.., CommitMode::Async)` passes librdkafka no
/// reply queue, so no result event is made and the callback is never called
/// (fede1024/rust-rdkafka#856): a failed commit would go unnoticed, and a
/// stopping worker could not tell when its last commit was answered.
pub fn commit_async<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &rdkafka::TopicPartitionList,
) -> rdkafka::error::KafkaResult<()> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: the client pointer is valid while `consumer` is borrowed; the
    // consumer queue reference taken here is released after the call, which
    // copies the offsets list (librdkafka keeps its own reference to the
    // queue until the result is posted on it).
    let err = unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(rdkafka::error::KafkaError::ConsumerCommit(
                RDKafkaErrorCode::InvalidArgument,
            ));
        }
        let err = rd::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(rdkafka::error::KafkaError::ConsumerCommit(err.into()))
    }
}

/// The low and high watermarks librdkafka last saw in fetch responses for a
/// partition, without asking the broker (so a broker that is down cannot
/// stall the caller); `None` before the first fetch.
pub fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed, the
    // topic is a NUL-terminated string that outlives the call, and the out
    // pointers are locals. librdkafka only reads its own cached state.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low, high))
}

/// The headers of a message as (name, value) bytes, in order. A header name
/// on the wire is any bytes, and rdkafka's `Headers::iter` panics on one that
/// is not UTF-8 (it unwraps `CStr::to_str`): one such message from any
/// producer would stop a worker at that offset for good. This reads the
/// names as bytes instead. A name ends at its first NUL byte, as everywhere in
/// librdkafka (it hands names out as C strings).
pub fn raw_headers<'a>(
    headers: Option<&'a OwnedHeaders>,
) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
    use rdkafka::bindings::{
        rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_resp_err_t,
    };
    // A `&BorrowedHeaders` is the address of the native headers (this cast
    // is rdkafka's own, private, `BorrowedHeaders::as_native_ptr`).
    let native = headers.map(|h| {
        h.as_borrowed() as *const rdkafka::message::BorrowedHeaders as *const rd_kafka_headers_t
    });
    // SAFETY: `native` points to the headers that `headers` owns, alive and
    // unchanged for 'a (`OwnedHeaders::insert` takes the headers by value).
    let count = native.map_or(0, |p| unsafe { rd_kafka_header_cnt(p) });
    (0..count).filter_map(move |idx| {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: as above; the out pointers are locals. librdkafka returns
        // pointers into the header, which lives as long as the headers: a
        // NUL-terminated name and a value of `size` bytes, or a null value.
        let err =
            unsafe { rd_kafka_header_get_all(native?, idx, &mut name, &mut value, &mut size) };
        if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some((name, value))
    })
}
