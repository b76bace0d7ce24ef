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
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// Timeout of metadata and admin requests at start-up.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A client configuration with the brokers and the `[kafka]` passthrough.
pub fn base_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("client.id", "idem");
    for (k, v) in config.kafka_properties() {
        c.set(k, v);
    }
    c
}

/// The consumer configuration of the worker's group.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut c = base_config(config);
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.auto_offset_reset)
        .set("enable.partition.eof", "false");
    c
}

/// The configuration of the dead-letter producer: idempotent, acks from all
/// in-sync replicas, so an acknowledged dead letter is durable.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = base_config(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    c
}

/// Number of partitions of `topic`, from broker metadata.
pub fn partition_count<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<usize> {
    let md = consumer
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .with_context(|| format!("fetching metadata of topic {topic}"))?;
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
    if partition_count(consumer, topic).is_ok_and(|n| n > 0) {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base_config(config)
        .create()
        .context("creating the Kafka admin client")?;
    let new = NewTopic::new(topic, partitions.max(1) as i32, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = futures::executor::block_on(admin.create_topics([&new], &opts))
        .with_context(|| format!("creating topic {topic}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
