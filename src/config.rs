//! Worker configuration: a TOML file, then `IDEM_*` environment variables,
//! then command-line flags, each overriding the one before.
//!
//! Guarantee: a [`Config`] that [`Config::load`] returns has passed
//! [`Config::validate`]; every rejection names the field (and the environment
//! variable when that was the source) and the values it allows.

use crate::payload::PayloadFormat;
use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which handler new messages go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// The built-in payment ledger in the same RocksDB.
    #[default]
    Ledger,
    /// POST each new message to the application (`[http]`).
    Http,
}

/// What happens to a message whose retries are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Hold the partition at the message and keep retrying at the longest
    /// delay, with an error log per attempt and the degraded gauge up: for
    /// payments, never skip.
    #[default]
    Pause,
    /// Dead-letter it (kind `retries_exhausted`, no dedup record, so a
    /// re-drive is handled) and go on.
    DeadLetter,
}

/// What the payload's `Content-Type` is sent as.
pub const CONTENT_TYPE_AUTO: &str = "auto";

/// The application behind the sidecar (`[http]`, with `handler = "http"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where each new message is POSTed (`http://` only: the application is
    /// beside the sidecar).
    pub url: String,
    /// Longest wait for a connection, milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for a whole response, milliseconds; a call that takes
    /// longer is retried (same idempotency key).
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept, milliseconds.
    pub pool_idle_timeout_ms: u64,
    /// Idle connections kept to the application.
    pub pool_max_idle: usize,
    /// Partitions of one batch called at the same time.
    pub max_in_flight: usize,
    /// `auto` (from the payload format: JSON, protobuf or octet-stream) or a
    /// fixed media type.
    pub content_type: String,
    /// Prefix of the request headers that carry the message's Kafka headers.
    pub header_prefix: String,
    /// Bytes of each successful response body kept with its record (for the
    /// reply topic); 0 keeps none (status and digest are always kept).
    pub keep_response_bytes: usize,
    /// Topic the application's responses are produced to, and the stored
    /// response again for each duplicate; empty: no replies.
    pub reply_topic: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080/events".into(),
            connect_timeout_ms: 2_000,
            request_timeout_ms: 10_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle: 32,
            max_in_flight: 16,
            content_type: CONTENT_TYPE_AUTO.into(),
            header_prefix: "Kafka-Header-".into(),
            keep_response_bytes: 65_536,
            reply_topic: String::new(),
        }
    }
}

/// How a message that could not be finished is tried again (`[retry]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before the first retry, milliseconds (exponential, full jitter).
    pub initial_delay_ms: u64,
    /// Longest delay between two attempts, milliseconds; also caps a
    /// `Retry-After`.
    pub max_delay_ms: u64,
    /// Attempts before `on_exhausted` applies (the first call included).
    pub max_attempts: u32,
    /// `pause` or `dead_letter`.
    pub on_exhausted: OnExhausted,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay_ms: 200,
            max_delay_ms: 30_000,
            max_attempts: 10,
            on_exhausted: OnExhausted::Pause,
        }
    }
}

/// The operations endpoint (`[metrics]`): Prometheus `/metrics`, `/healthz`
/// and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to listen on; empty disables the endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// The changelog (`[changelog]`): every dedup record is also produced to a
/// compacted topic partitioned like its source, and restored from it when a
/// partition is assigned, so that partitions can move between workers
/// without their keys being forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangelogConfig {
    /// Produce and restore the changelog (default on). Needed whenever
    /// more than one worker runs in the group (every sidecar deployment
    /// with more than one pod), or a worker's store can be replaced.
    pub enabled: bool,
    /// Changelog topic of each source topic; `{group}` and `{topic}` are
    /// replaced, and `{topic}` is required.
    pub topic: String,
    /// Retention of the changelog past the window and one bucket, seconds.
    pub retention_margin_secs: u64,
}

impl Default for ChangelogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: "{group}.idem-changelog.{topic}".into(),
            retention_margin_secs: 3600,
        }
    }
}

/// Where a newly assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResumeFrom {
    /// The later of the store's checkpoint and the group's committed offset:
    /// after a crash between the durable write and the commit, nothing is read
    /// twice.
    #[default]
    Newest,
    /// The group's committed offset as it is: after an operator rewound the
    /// group on purpose, the rewound messages are read again and resolve as
    /// duplicates.
    Group,
}

/// Which time decides the bucket a record is filed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BucketClock {
    /// When idem processed the message (never runs backwards).
    #[default]
    Processing,
    /// The Kafka message timestamp, so a replay of an old topic files its
    /// records the same way every time. A timestamp that is missing, in the
    /// future, or older than the window falls back to the processing clock
    /// and is counted (`event_time_fallbacks`).
    Event,
}

/// What happens when the store would pass `max_store_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreFull {
    /// Stop handling (the worker exits with the reason; nothing of the batch
    /// is committed). For payments: never forget a key early.
    #[default]
    FailClosed,
    /// Drop the oldest bucket before its window ends, with a loud warning and
    /// a count, so the worker keeps going with a shorter effective window.
    DropOldest,
}

/// What a topic's messages do while the dedup store cannot be written
/// (a full disk, a read-only or failing filesystem, a store being reopened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreFailure {
    /// Handle nothing and commit nothing until the store takes writes again:
    /// for payments, no message is handled without durable dedup.
    #[default]
    FailClosed,
    /// Keep handling, with dedup against the store's reads (when they still
    /// work) and a bounded in-memory guard of the keys handled since the
    /// failure; offsets are committed; every such message is counted as
    /// unverified, and the guard is written into the store when it returns.
    /// Needs `handler = "http"`: the ledger's balances live in the store.
    FailOpen,
}

/// Per-topic overrides of how keys are derived, scoped and decoded
/// (`[topic_rules.<topic>]`); what is not set comes from the top level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRules {
    /// Header with the key; `""` disables.
    pub key_header: Option<String>,
    /// JSON pointer (or `PaymentEvent` field) with the key; `""` disables.
    pub key_field: Option<String>,
    /// A semantic or composed key (see [`crate::key::CompositeKey`]).
    pub key: Option<crate::key::CompositeKey>,
    /// The scope of this topic's keys (a step of a flow: `capture`, `ship`).
    pub scope: Option<String>,
    /// How this topic's payloads are encoded.
    pub payload_format: Option<PayloadFormat>,
    /// What this topic does while the store cannot be written.
    pub on_store_failure: Option<OnStoreFailure>,
}

/// A named scope's own settings (`[scopes.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// How long a key of this scope is remembered, at most `window_secs`.
    pub window_secs: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Text for people.
    #[default]
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Everything a worker needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Consumer group; also the default dedup scope.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Directory of the RocksDB dedup store.
    pub store_dir: PathBuf,
    /// Scope that qualifies every key; defaults to `group_id`.
    pub scope: Option<String>,
    /// Handler for new messages.
    pub handler: HandlerKind,
    /// How payloads are encoded.
    pub payload_format: PayloadFormat,
    /// Header that carries the idempotency key; empty disables.
    pub key_header: String,
    /// JSON pointer (or PaymentEvent field) that carries the key; empty disables.
    pub key_field: String,
    /// How long a key is remembered at least, seconds.
    pub window_secs: u64,
    /// Width of a dedup bucket, seconds.
    pub bucket_secs: u64,
    /// Whether a duplicate re-files its record into the current bucket, so
    /// the window counts from the last sighting. Default false: the window
    /// counts from the first sighting, as payment APIs promise ("a key is
    /// remembered for 24 h"), and a key retried forever is eventually new.
    pub refresh_on_duplicate: bool,
    /// `processing` or `event`: which time files a record into a bucket.
    pub bucket_clock: BucketClock,
    /// Largest size of the store in bytes; 0 means no cap.
    pub max_store_bytes: u64,
    /// What happens over `max_store_bytes`: `fail_closed` (stop handling)
    /// or `drop_oldest` (forget the oldest keys early, loudly).
    pub on_store_full: OnStoreFull,
    /// What topics do while the store cannot be written: `fail_closed`
    /// (default) or `fail_open`; `topic_rules.<topic>` may override it.
    pub on_store_failure: OnStoreFailure,
    /// Most keys the fail-open guard holds in memory; past it the oldest are
    /// forgotten (and counted), so memory stays bounded.
    pub fail_open_max_keys: usize,
    /// Largest payload handled, bytes; a larger one is dead-lettered
    /// (`too_large`, without its payload). 0: no limit but the fetch limit.
    pub max_payload_bytes: usize,
    /// Most messages in one batch (one RocksDB write, one fsync).
    pub batch_size: usize,
    /// How long to wait for a batch to fill, milliseconds.
    pub batch_linger_ms: u64,
    /// Write and sync a batch on a thread of its own while the next batches
    /// are processed, and commit its offsets once that write returned
    /// (`true`), instead of writing it in the loop (`false`). Either way an
    /// offset is committed only after its batch is durable.
    pub overlap_wal_sync: bool,
    /// Least time between two offset commits while batches flow,
    /// milliseconds; 0 commits after every durable batch. Only durable
    /// offsets are ever committed, and a revocation or a stop commits the
    /// latest at once whatever the interval: a longer one costs a crashed
    /// worker's successor more re-reading (duplicates, known to the store),
    /// never a message. Each commit is a write to the group coordinator.
    pub commit_interval_ms: u64,
    /// Dead-letter topic; `{topic}` is replaced by the source topic.
    pub dead_letter_topic: String,
    /// Where a group with no committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Create missing dead-letter topics at start-up.
    pub create_topics: bool,
    /// Where a newly assigned partition starts: `newest` or `group`.
    pub resume_from: ResumeFrom,
    /// Longest a SIGTERM shutdown may take before the process exits anyway.
    pub shutdown_timeout_secs: u64,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// A semantic or composed key, tried after the header and the field.
    pub key: Option<crate::key::CompositeKey>,
    /// Per-topic overrides of key, scope and payload format.
    pub topic_rules: BTreeMap<String, TopicRules>,
    /// Named scopes with their own (shorter) windows.
    pub scopes: BTreeMap<String, ScopeConfig>,
    /// librdkafka properties passed through (security, tuning). A value
    /// `${env:NAME}` or `${file:/path}` is read from the environment or a
    /// file when the worker starts, so secrets stay out of the config.
    pub kafka: BTreeMap<String, toml::Value>,
    /// The application, with `handler = "http"`.
    pub http: HttpConfig,
    /// Retries of messages that could not be finished.
    pub retry: RetryConfig,
    /// The operations endpoint.
    pub metrics: MetricsConfig,
    /// The changelog that lets partitions move between workers.
    pub changelog: ChangelogConfig,
    /// Things worth a warning at start-up that are not errors (an `IDEM_*`
    /// variable that sets nothing, a scope no topic uses).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "idem".into(),
            topics: Vec::new(),
            store_dir: PathBuf::from("idem-store"),
            scope: None,
            handler: HandlerKind::Ledger,
            payload_format: PayloadFormat::Auto,
            key_header: "Idempotency-Key".into(),
            key_field: "/event_id".into(),
            window_secs: 24 * 3600,
            bucket_secs: 3600,
            refresh_on_duplicate: false,
            bucket_clock: BucketClock::Processing,
            max_store_bytes: 0,
            on_store_full: OnStoreFull::FailClosed,
            on_store_failure: OnStoreFailure::FailClosed,
            fail_open_max_keys: 100_000,
            max_payload_bytes: 0,
            batch_size: 500,
            batch_linger_ms: 10,
            overlap_wal_sync: false,
            commit_interval_ms: 0,
            dead_letter_topic: "{topic}.dlq".into(),
            auto_offset_reset: "earliest".into(),
            create_topics: true,
            resume_from: ResumeFrom::Newest,
            shutdown_timeout_secs: 30,
            log_format: LogFormat::Human,
            key: None,
            topic_rules: BTreeMap::new(),
            scopes: BTreeMap::new(),
            kafka: BTreeMap::new(),
            http: HttpConfig::default(),
            retry: RetryConfig::default(),
            metrics: MetricsConfig::default(),
            changelog: ChangelogConfig::default(),
            warnings: Vec::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    List,
}

/// The settings that `IDEM_<NAME>` environment variables may override.
const ENV_FIELDS: &[(&str, Kind)] = &[
    ("brokers", Kind::Str),
    ("group_id", Kind::Str),
    ("topics", Kind::List),
    ("store_dir", Kind::Str),
    ("scope", Kind::Str),
    ("handler", Kind::Str),
    ("payload_format", Kind::Str),
    ("key_header", Kind::Str),
    ("key_field", Kind::Str),
    ("window_secs", Kind::Int),
    ("bucket_secs", Kind::Int),
    ("refresh_on_duplicate", Kind::Bool),
    ("bucket_clock", Kind::Str),
    ("max_store_bytes", Kind::Int),
    ("on_store_full", Kind::Str),
    ("on_store_failure", Kind::Str),
    ("fail_open_max_keys", Kind::Int),
    ("max_payload_bytes", Kind::Int),
    ("batch_size", Kind::Int),
    ("batch_linger_ms", Kind::Int),
    ("overlap_wal_sync", Kind::Bool),
    ("commit_interval_ms", Kind::Int),
    ("dead_letter_topic", Kind::Str),
    ("auto_offset_reset", Kind::Str),
    ("create_topics", Kind::Bool),
    ("resume_from", Kind::Str),
    ("shutdown_timeout_secs", Kind::Int),
    ("log_format", Kind::Str),
];

/// Sections whose fields `IDEM_<SECTION>__<FIELD>` variables may override.
const ENV_SECTIONS: &[(&str, &[(&str, Kind)])] = &[
    (
        "http",
        &[
            ("url", Kind::Str),
            ("connect_timeout_ms", Kind::Int),
            ("request_timeout_ms", Kind::Int),
            ("pool_idle_timeout_ms", Kind::Int),
            ("pool_max_idle", Kind::Int),
            ("max_in_flight", Kind::Int),
            ("content_type", Kind::Str),
            ("header_prefix", Kind::Str),
            ("keep_response_bytes", Kind::Int),
            ("reply_topic", Kind::Str),
        ],
    ),
    (
        "retry",
        &[
            ("initial_delay_ms", Kind::Int),
            ("max_delay_ms", Kind::Int),
            ("max_attempts", Kind::Int),
            ("on_exhausted", Kind::Str),
        ],
    ),
    ("metrics", &[("listen", Kind::Str)]),
    (
        "changelog",
        &[
            ("enabled", Kind::Bool),
            ("topic", Kind::Str),
            ("retention_margin_secs", Kind::Int),
        ],
    ),
];

/// librdkafka properties idem sets itself; setting them in `[kafka]` would
/// break its guarantees or duplicate a top-level field.
const RESERVED_KAFKA: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "idem commits offsets only after the durable write",
    ),
    (
        "enable.auto.offset.store",
        "idem stores offsets only after the durable write",
    ),
    ("group.id", "use the top-level `group_id`"),
    ("bootstrap.servers", "use the top-level `brokers`"),
    ("auto.offset.reset", "use the top-level `auto_offset_reset`"),
];

impl Config {
    /// Loads `file` (if given; it must then exist), overlays `IDEM_*` from
    /// `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        let unknown = apply_env(&mut table, env)?;
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        config.warnings = unknown
            .into_iter()
            .map(|n| {
                format!("environment variable {n} sets no idem setting (misspelt?); it is ignored")
            })
            .collect();
        Ok(config)
    }

    /// The start-up warnings: [`Config::warnings`] and `[scopes.x]` entries
    /// that no topic uses.
    pub fn all_warnings(&self) -> Vec<String> {
        let mut out = self.warnings.clone();
        let used: Vec<&str> = std::iter::once(self.scope())
            .chain(self.topic_rules.values().filter_map(|o| o.scope.as_deref()))
            .collect();
        for name in self.scopes.keys() {
            if !used.contains(&name.as_str()) {
                out.push(format!(
                    "`scopes.{name}` is configured but no topic uses scope {name:?}"
                ));
            }
        }
        out
    }

    /// The scope that qualifies every key.
    pub fn scope(&self) -> &str {
        self.scope.as_deref().unwrap_or(&self.group_id)
    }

    /// How this configuration derives, scopes and decodes keys: the same for
    /// the worker and for a replay, so both decide alike.
    pub fn decider(&self) -> crate::pipeline::Decider {
        let rule = |o: &TopicRules| {
            let header = o.key_header.as_ref().unwrap_or(&self.key_header);
            let field = o.key_field.as_ref().unwrap_or(&self.key_field);
            let scope = o.scope.as_deref().unwrap_or(self.scope()).to_string();
            crate::pipeline::TopicRule {
                key_rule: crate::key::KeyRule {
                    header: (!header.is_empty()).then(|| header.clone()),
                    field: (!field.is_empty()).then(|| field.clone()),
                    composite: o.key.clone().or_else(|| self.key.clone()),
                },
                window_ms: self.scopes.get(&scope).map(|s| s.window_secs as i64 * 1000),
                scope,
                format: o.payload_format.unwrap_or(self.payload_format),
            }
        };
        let mut decider = crate::pipeline::Decider::new(rule(&TopicRules::default()))
            .with_max_payload(self.max_payload_bytes);
        for (topic, o) in &self.topic_rules {
            decider = decider.with_topic(topic, rule(o));
        }
        decider
    }

    /// The dead-letter topic for a source topic.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic.replace("{topic}", topic)
    }

    /// The changelog topic of source `topic`.
    pub fn changelog_topic_for(&self, topic: &str) -> String {
        crate::changelog::topic_for(&self.changelog.topic, &self.group_id, topic)
    }

    /// How long the changelog keeps records: the longest window, one
    /// bucket and the margin, milliseconds.
    pub fn changelog_retention_ms(&self) -> u64 {
        // Scopes' windows are at most `window_secs`.
        (self.window_secs + self.bucket_secs + self.changelog.retention_margin_secs)
            .saturating_mul(1000)
    }

    /// The `[kafka]` passthrough as librdkafka strings, with `${env:NAME}`
    /// and `${file:/path}` values read in.
    pub fn kafka_properties(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.kafka
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => resolve_secret(k, s)?,
                    other => other.to_string(),
                };
                Ok((k.clone(), v))
            })
            .collect()
    }

    /// Checks every field; the error names the field and what it allows.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.topics.is_empty() {
            bail!("`topics` must name at least one topic (config `topics = [..]`, IDEM_TOPICS=a,b or --topic)");
        }
        for t in self.topic_rules.keys() {
            if !self.topics.contains(t) {
                bail!(
                    "`topic_rules.{t}` configures a topic that is not in `topics` {:?}",
                    self.topics
                );
            }
        }
        self.validate_except_topics()
    }

    /// Checks every field but `topics`: for commands such as `replay` that
    /// name their topic themselves.
    pub fn validate_except_topics(&self) -> anyhow::Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("`brokers` must be host:port[,host:port...], got an empty value");
        }
        if self.group_id.trim().is_empty() {
            bail!("`group_id` must not be empty");
        }
        for t in &self.topics {
            validate_topic_name("topics", t)?;
            let dlq = self.dead_letter_topic_for(t);
            if dlq == *t {
                bail!("`dead_letter_topic` must differ from the source topic `{t}`");
            }
            validate_topic_name("dead_letter_topic", &dlq)?;
        }
        self.validate_changelog()?;
        if self.store_dir.as_os_str().is_empty() {
            bail!("`store_dir` must be a directory path");
        }
        if self.scope.as_deref().is_some_and(|s| s.is_empty()) {
            bail!("`scope` must not be empty when set");
        }
        validate_key_field("key_field", &self.key_field)?;
        if self.bucket_secs == 0 || self.window_secs == 0 {
            bail!("`window_secs` and `bucket_secs` must be at least 1 second");
        }
        if self.bucket_secs > self.window_secs {
            bail!(
                "`bucket_secs` ({}) must be at most `window_secs` ({})",
                self.bucket_secs,
                self.window_secs
            );
        }
        if self.refresh_on_duplicate && self.bucket_clock == BucketClock::Event {
            bail!("`refresh_on_duplicate = true` needs `bucket_clock = \"processing\"`: with `event` a record's bucket is its message's timestamp");
        }
        if self.window_secs > 366 * 24 * 3600 {
            bail!(
                "`window_secs` must be at most one year (31622400), got {}",
                self.window_secs
            );
        }
        if !(1..=100_000).contains(&self.batch_size) {
            bail!(
                "`batch_size` must be between 1 and 100000, got {}",
                self.batch_size
            );
        }
        if self.batch_linger_ms > 60_000 {
            bail!(
                "`batch_linger_ms` must be between 0 and 60000, got {}",
                self.batch_linger_ms
            );
        }
        if self.commit_interval_ms > 60_000 {
            bail!(
                "`commit_interval_ms` must be between 0 and 60000, got {}",
                self.commit_interval_ms
            );
        }
        if !["earliest", "latest"].contains(&self.auto_offset_reset.as_str()) {
            bail!(
                "`auto_offset_reset` must be one of earliest, latest; got {:?}",
                self.auto_offset_reset
            );
        }
        if !(1..=3600).contains(&self.shutdown_timeout_secs) {
            bail!(
                "`shutdown_timeout_secs` must be between 1 and 3600, got {}",
                self.shutdown_timeout_secs
            );
        }
        if let Some(k) = &self.key {
            k.validate()?;
        }
        for (t, o) in &self.topic_rules {
            if let Some(k) = &o.key {
                k.validate()
                    .with_context(|| format!("in `topic_rules.{t}`"))?;
            }
            if let Some(f) = &o.key_field {
                validate_key_field(&format!("topic_rules.{t}.key_field"), f)?;
            }
            if o.scope.as_deref().is_some_and(str::is_empty) {
                bail!("`topic_rules.{t}.scope` must not be empty when set");
            }
        }
        for (name, sc) in &self.scopes {
            if sc.window_secs == 0 || sc.window_secs > self.window_secs {
                bail!(
                    "`scopes.{name}.window_secs` must be between 1 and `window_secs` ({}): the store keeps buckets for `window_secs`; got {}",
                    self.window_secs,
                    sc.window_secs
                );
            }
        }
        for (key, value) in &self.kafka {
            if let Some((_, why)) = RESERVED_KAFKA.iter().find(|(k, _)| k == key) {
                bail!("`kafka.\"{key}\"` cannot be set: {why}");
            }
            if matches!(value, toml::Value::Array(_) | toml::Value::Table(_)) {
                bail!("`kafka.\"{key}\"` must be a string, number or boolean");
            }
            if let toml::Value::String(s) = value {
                resolve_secret(key, s)?;
            }
        }
        crate::kafka::check_properties(self)?;
        self.validate_store_failure()?;
        self.validate_http()?;
        self.validate_retry()?;
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bail!(
                "`metrics.listen` must be host:port with a numeric host such as \"127.0.0.1:9464\" (or empty to disable), got {:?}",
                self.metrics.listen
            );
        }
        Ok(())
    }

    /// The policy of `topic` while the store cannot be written.
    pub fn on_store_failure_for(&self, topic: &str) -> OnStoreFailure {
        self.topic_rules
            .get(topic)
            .and_then(|r| r.on_store_failure)
            .unwrap_or(self.on_store_failure)
    }

    fn validate_store_failure(&self) -> anyhow::Result<()> {
        let open: Vec<&str> = self
            .topics
            .iter()
            .filter(|t| self.on_store_failure_for(t) == OnStoreFailure::FailOpen)
            .map(String::as_str)
            .collect();
        let open_anywhere = !open.is_empty()
            || self.on_store_failure == OnStoreFailure::FailOpen
            || self
                .topic_rules
                .values()
                .any(|r| r.on_store_failure == Some(OnStoreFailure::FailOpen));
        if open_anywhere && self.handler != HandlerKind::Http {
            bail!(
                "`on_store_failure = \"fail_open\"`{} needs `handler = \"http\"`: the ledger handler's balances are written in the dedup store's own batch, so it cannot run while the store is down; use `fail_closed`",
                if open.is_empty() { String::new() } else { format!(" (topics {open:?})") }
            );
        }
        if !(1..=10_000_000).contains(&self.fail_open_max_keys) {
            bail!(
                "`fail_open_max_keys` must be between 1 and 10000000, got {}",
                self.fail_open_max_keys
            );
        }
        Ok(())
    }

    fn validate_changelog(&self) -> anyhow::Result<()> {
        if !self.changelog.topic.contains("{topic}") {
            bail!(
                "`changelog.topic` must contain `{{topic}}` (each source topic has its own changelog), got {:?}",
                self.changelog.topic
            );
        }
        for t in &self.topics {
            let c = self.changelog_topic_for(t);
            if self.topics.contains(&c) || c == self.dead_letter_topic_for(t) {
                bail!("`changelog.topic` names {c:?}, which is a source or dead-letter topic");
            }
            validate_topic_name("changelog.topic", &c)?;
        }
        Ok(())
    }

    fn validate_http(&self) -> anyhow::Result<()> {
        let h = &self.http;
        if self.handler == HandlerKind::Http {
            validate_http_url(&h.url)?;
        }
        for (name, v, lo, hi) in [
            ("connect_timeout_ms", h.connect_timeout_ms, 1, 600_000),
            ("request_timeout_ms", h.request_timeout_ms, 1, 3_600_000),
            ("pool_idle_timeout_ms", h.pool_idle_timeout_ms, 0, 3_600_000),
        ] {
            if !(lo..=hi).contains(&v) {
                bail!("`http.{name}` must be between {lo} and {hi}, got {v}");
            }
        }
        if !(1..=1024).contains(&h.max_in_flight) {
            bail!(
                "`http.max_in_flight` must be between 1 and 1024, got {}",
                h.max_in_flight
            );
        }
        if h.pool_max_idle > 4096 {
            bail!(
                "`http.pool_max_idle` must be between 0 and 4096, got {}",
                h.pool_max_idle
            );
        }
        if h.keep_response_bytes > 16 << 20 {
            bail!(
                "`http.keep_response_bytes` must be between 0 and 16777216, got {}",
                h.keep_response_bytes
            );
        }
        if self.handler == HandlerKind::Http {
            // A batch waits for its slowest call (plus the 2 s lane budget);
            // past max.poll.interval.ms librdkafka leaves the group.
            let poll_interval = self
                .kafka
                .get("max.poll.interval.ms")
                .and_then(|v| match v {
                    toml::Value::Integer(i) => Some(*i as u64),
                    toml::Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                })
                .unwrap_or(300_000);
            if h.request_timeout_ms + 2_000 >= poll_interval {
                bail!(
                    "`http.request_timeout_ms` ({}) plus 2000 must stay below `kafka.\"max.poll.interval.ms\"` ({poll_interval}): a batch waits for its slowest call, and a worker that does not poll within max.poll.interval.ms loses its partitions",
                    h.request_timeout_ms
                );
            }
        }
        if h.connect_timeout_ms > h.request_timeout_ms {
            bail!(
                "`http.connect_timeout_ms` ({}) must be at most `http.request_timeout_ms` ({}): the request timeout covers the connection",
                h.connect_timeout_ms,
                h.request_timeout_ms
            );
        }
        if h.content_type != CONTENT_TYPE_AUTO && !is_media_type(&h.content_type) {
            bail!(
                "`http.content_type` must be \"auto\" or a media type such as \"application/json\", got {:?}",
                h.content_type
            );
        }
        let prefix = h.header_prefix.to_ascii_lowercase();
        let reserved = [
            "idem",
            "content-",
            "transfer-",
            "x-forwarded-",
            "proxy-",
            "sec-",
        ];
        if h.header_prefix.len() < 2
            || !h.header_prefix.ends_with('-')
            || !h
                .header_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || reserved.iter().any(|r| prefix.starts_with(r))
        {
            bail!(
                "`http.header_prefix` must be letters, digits and -, end with - and not start with {} (so that a Kafka header can never pose as one of idem's or HTTP's own), such as \"Kafka-Header-\"; got {:?}",
                reserved.join(", "),
                h.header_prefix
            );
        }
        if !h.reply_topic.is_empty() {
            validate_topic_name("http.reply_topic", &h.reply_topic)?;
            if self.handler != HandlerKind::Http {
                bail!("`http.reply_topic` needs `handler = \"http\"`: replies are the application's responses");
            }
            if self.topics.contains(&h.reply_topic)
                || self
                    .topics
                    .iter()
                    .any(|t| self.dead_letter_topic_for(t) == h.reply_topic)
            {
                bail!(
                    "`http.reply_topic` must differ from the source topics and their dead-letter topics, got {:?}",
                    h.reply_topic
                );
            }
        }
        Ok(())
    }

    fn validate_retry(&self) -> anyhow::Result<()> {
        let r = &self.retry;
        if !(1..=3_600_000).contains(&r.initial_delay_ms) {
            bail!(
                "`retry.initial_delay_ms` must be between 1 and 3600000, got {}",
                r.initial_delay_ms
            );
        }
        if r.max_delay_ms < r.initial_delay_ms || r.max_delay_ms > 3_600_000 {
            bail!(
                "`retry.max_delay_ms` must be between `retry.initial_delay_ms` ({}) and 3600000, got {}",
                r.initial_delay_ms,
                r.max_delay_ms
            );
        }
        if !(1..=1_000_000).contains(&r.max_attempts) {
            bail!(
                "`retry.max_attempts` must be between 1 and 1000000, got {}",
                r.max_attempts
            );
        }
        Ok(())
    }
}

/// Checks `http.url`: `http://host[:port][/path]`, with no credentials
/// (they would end up in logs and dead letters).
fn validate_http_url(url: &str) -> anyhow::Result<()> {
    let example = "such as \"http://127.0.0.1:8080/events\"";
    let parsed = reqwest::Url::parse(url)
        .with_context(|| format!("`http.url` must be an http:// URL {example}, got {url:?}"))?;
    if parsed.scheme() != "http" {
        bail!("`http.url` must be an http:// URL {example} (https is not supported: the application is beside idem), got {url:?}");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        bail!("`http.url` must name a host, {example}; got {url:?}");
    }
    if parsed.port() == Some(0) {
        bail!("`http.url` must name a port between 1 and 65535, got {url:?}");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        bail!("`http.url` must not carry credentials (user:password@): they would be written to logs and dead letters");
    }
    if url.contains(char::is_whitespace) {
        bail!("`http.url` must not contain spaces (percent-encode them as %20), got {url:?}");
    }
    Ok(())
}

/// True for `type/subtype` with optional parameters, as `Content-Type`
/// takes it.
fn is_media_type(s: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let (essence, params) = s.split_once(';').unwrap_or((s, ""));
    let ok_params = params.is_empty() || reqwest::header::HeaderValue::from_str(params).is_ok();
    match essence.trim_end().split_once('/') {
        Some((t, sub)) => token(t) && token(sub) && ok_params,
        None => false,
    }
}

/// Reads a `${env:NAME}` or `${file:/path}` value of `[kafka]`; any other
/// value is returned as it is. The error names the property, never the
/// secret.
fn resolve_secret(key: &str, value: &str) -> anyhow::Result<String> {
    if value.starts_with("${") && !value.ends_with('}') {
        bail!("`kafka.\"{key}\"`: a value that starts with ${{ must end with }} (${{env:NAME}} or ${{file:/path}})");
    }
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else {
        return Ok(value.to_string());
    };
    if let Some(name) = inner.strip_prefix("env:") {
        return std::env::var(name).with_context(|| {
            format!("`kafka.\"{key}\"` = \"${{env:{name}}}\": the environment variable {name} is not set (or not UTF-8)")
        });
    }
    if let Some(path) = inner.strip_prefix("file:") {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("`kafka.\"{key}\"` = \"${{file:{path}}}\": cannot read the file")
        })?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    bail!("`kafka.\"{key}\"`: a value in ${{..}} must be ${{env:NAME}} or ${{file:/path}}")
}

fn validate_key_field(name: &str, field: &str) -> anyhow::Result<()> {
    if field.contains(char::is_whitespace) || (!field.is_empty() && !field.starts_with('/')) {
        bail!(
            "`{name}` must be a JSON pointer such as \"/event_id\" (or empty to disable), got {field:?}"
        );
    }
    Ok(())
}

fn validate_topic_name(field: &str, t: &str) -> anyhow::Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!("`{field}`: {t:?} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)");
    }
    Ok(())
}

/// `IDEM_*` variables that belong to the tests and scripts, not to a worker.
const FOREIGN_ENV: &[&str] = &["IDEM_TEST_", "IDEM_BROKER_DIR"];

/// Overlays `IDEM_*` variables on `table`; returns the names of `IDEM_*`
/// variables that set nothing (a misspelling, for the start-up warning).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Vec<String>> {
    let mut unknown = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("IDEM_") else {
            continue;
        };
        if let Some(prop) = rest.strip_prefix("KAFKA__") {
            // IDEM_KAFKA__SASL_PASSWORD -> kafka."sasl.password"
            let prop = prop.to_ascii_lowercase().replace('_', ".");
            let kafka = table
                .entry("kafka")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(kafka) = kafka else {
                bail!("`kafka` in the config file must be a table");
            };
            kafka.insert(prop, toml::Value::String(raw));
            continue;
        }
        if let Some((section, field)) = rest.to_ascii_lowercase().split_once("__") {
            let known = ENV_SECTIONS
                .iter()
                .find(|(s, _)| *s == section)
                .and_then(|(_, fields)| fields.iter().find(|(f, _)| *f == field));
            let Some((_, kind)) = known else {
                if !FOREIGN_ENV.iter().any(|p| name.starts_with(p)) {
                    unknown.push(name);
                }
                continue;
            };
            let value = env_value(&name, &format!("{section}.{field}"), *kind, raw)?;
            let entry = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = entry else {
                bail!("`{section}` in the config file must be a table");
            };
            t.insert(field.to_string(), value);
            continue;
        }
        let field = rest.to_ascii_lowercase();
        let Some((_, kind)) = ENV_FIELDS.iter().find(|(f, _)| *f == field) else {
            if !FOREIGN_ENV.iter().any(|p| name.starts_with(p)) {
                unknown.push(name);
            }
            continue;
        };
        let value = env_value(&name, &field, *kind, raw)?;
        table.insert(field, value);
    }
    Ok(unknown)
}

/// The TOML value of environment variable `name` for `field`.
fn env_value(name: &str, field: &str, kind: Kind, raw: String) -> anyhow::Result<toml::Value> {
    Ok(match kind {
        Kind::Str => toml::Value::String(raw),
        Kind::Int => toml::Value::Integer(
            raw.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .with_context(|| {
                    // The field's own range is checked with the rest of
                    // the configuration; this is the type.
                    format!(
                        "{name}: `{field}` must be a whole number in digits (0 to {}), got {raw:?}",
                        i64::MAX
                    )
                })?,
        ),
        Kind::Bool => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => bail!("{name}: `{field}` must be true or false, got {raw:?}"),
        }),
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file_and_kafka_props_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idem.toml");
        std::fs::write(
            &file,
            "topics = [\"a\"]\nbatch_size = 10\n[kafka]\n\"fetch.min.bytes\" = 1\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("IDEM_BATCH_SIZE", "20"),
                ("IDEM_TOPICS", "x, y"),
                ("IDEM_KAFKA__SASL_PASSWORD", "s3cret"),
            ]),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.batch_size, 20);
        assert_eq!(c.topics, vec!["x", "y"]);
        assert_eq!(
            c.kafka_properties().unwrap(),
            vec![
                ("fetch.min.bytes".to_string(), "1".to_string()),
                ("sasl.password".to_string(), "s3cret".to_string())
            ]
        );
        assert_eq!(c.dead_letter_topic_for("x"), "x.dlq");
    }

    #[test]
    fn fail_open_needs_the_http_handler_and_may_be_set_per_topic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idem.toml");
        std::fs::write(
            &file,
            "topics = [\"a\", \"b\"]\n[topic_rules.b]\non_store_failure = \"fail_open\"\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), env(&[]))
            .unwrap()
            .validate()
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(
                "`on_store_failure = \"fail_open\"` (topics [\"b\"]) needs `handler = \"http\"`"
            ),
            "{text}"
        );
        let c = Config::load(Some(&file), env(&[("IDEM_HANDLER", "http")])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.on_store_failure_for("a"), OnStoreFailure::FailClosed);
        assert_eq!(c.on_store_failure_for("b"), OnStoreFailure::FailOpen);
        let err = Config::load(
            None,
            env(&[
                ("IDEM_TOPICS", "a"),
                ("IDEM_HANDLER", "http"),
                ("IDEM_ON_STORE_FAILURE", "fail_opn"),
            ]),
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("in `on_store_failure`"), "{text}");
        assert!(text.contains("fail_open"), "{text}");
        let err = Config::load(
            None,
            env(&[
                ("IDEM_TOPICS", "a"),
                ("IDEM_HANDLER", "http"),
                ("IDEM_FAIL_OPEN_MAX_KEYS", "0"),
            ]),
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(format!("{err:#}")
            .contains("`fail_open_max_keys` must be between 1 and 10000000, got 0"));
    }

    #[test]
    fn bad_values_name_the_field_and_the_allowed_values() {
        let err = Config::load(None, env(&[("IDEM_BATCH_SIZE", "lots")])).unwrap_err();
        assert!(format!("{err:#}").contains("IDEM_BATCH_SIZE: `batch_size` must be a whole number"));
        let c = Config::load(
            None,
            env(&[("IDEM_WINDOW_SEC", "5"), ("IDEM_TEST_BROKERS", "x")]),
        )
        .unwrap();
        assert_eq!(
            c.all_warnings(),
            vec!["environment variable IDEM_WINDOW_SEC sets no idem setting (misspelt?); it is ignored"]
        );
        let err = Config::load(None, env(&[("IDEM_MAX_STORE_BYTES", "-1")])).unwrap_err();
        assert!(format!("{err:#}").contains(
            "IDEM_MAX_STORE_BYTES: `max_store_bytes` must be a whole number in digits (0 to 9223372036854775807), got \"-1\""
        ));
        let err = Config::load(None, env(&[("IDEM_HANDLER", "teleport")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown variant `teleport`, expected `ledger` or `http`")
        );
        let mut c = Config {
            topics: vec!["t".into()],
            ..Config::default()
        };
        c.validate().unwrap();
        c.bucket_secs = c.window_secs + 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`bucket_secs`"));
        c.bucket_secs = 60;
        c.auto_offset_reset = "middle".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("one of earliest, latest"));
        c.auto_offset_reset = "latest".into();
        c.commit_interval_ms = 60_001;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "`commit_interval_ms` must be between 0 and 60000, got 60001"
        );
        c.commit_interval_ms = 5_000;
        c.kafka
            .insert("enable.auto.commit".into(), toml::Value::Boolean(true));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("enable.auto.commit"));
        c.kafka.clear();
        c.topics = vec!["bad topic".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a valid Kafka topic name"));
    }

    #[test]
    fn unknown_fields_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idem.toml");
        std::fs::write(&file, "topix = [\"a\"]\n").unwrap();
        let err = Config::load(Some(&file), env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `topix`"));
    }

    #[test]
    fn topic_rules_and_scopes_shape_the_decider() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idem.toml");
        std::fs::write(
            &file,
            r#"
topics = ["payments", "shipments"]
window_secs = 604800
key = { fields = ["account_id", "amount_minor", "currency"] }
[topic_rules.shipments]
scope = "ship"
key_header = ""
payload_format = "json"
[scopes.ship]
window_secs = 7200
"#,
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[])).unwrap();
        c.validate().unwrap();
        let d = c.decider();
        let pay = d.rule("payments");
        assert_eq!(pay.scope, "idem");
        assert_eq!(pay.window_ms, None);
        assert_eq!(pay.key_rule.header.as_deref(), Some("Idempotency-Key"));
        assert_eq!(pay.key_rule.composite.as_ref().unwrap().fields.len(), 3);
        let ship = d.rule("shipments");
        assert_eq!(ship.scope, "ship");
        assert_eq!(ship.window_ms, Some(7_200_000));
        assert_eq!(ship.key_rule.header, None);
        assert_eq!(ship.format, PayloadFormat::Json);

        let mut bad = c.clone();
        bad.scopes.get_mut("ship").unwrap().window_secs = 604_801;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`scopes.ship.window_secs` must be between 1 and `window_secs` (604800)"));
        let mut bad = c.clone();
        bad.topic_rules
            .insert("refunds".into(), TopicRules::default());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`topic_rules.refunds` configures a topic that is not in `topics`"));
        let mut bad = c;
        bad.key = Some(crate::key::CompositeKey {
            fields: vec![],
            parts: vec![],
        });
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("exactly one of `fields`"));
    }

    #[test]
    fn sidecar_sections_are_validated_and_set_from_the_environment() {
        let c = Config::load(
            None,
            env(&[
                ("IDEM_TOPICS", "t"),
                ("IDEM_HANDLER", "http"),
                ("IDEM_HTTP__URL", "http://app:8080/hook"),
                ("IDEM_RETRY__MAX_ATTEMPTS", "3"),
                ("IDEM_RETRY__ON_EXHAUSTED", "dead_letter"),
                ("IDEM_METRICS__LISTEN", ""),
            ]),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.http.url, "http://app:8080/hook");
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.on_exhausted, OnExhausted::DeadLetter);
        assert_eq!(c.metrics.listen, "");
        let err = Config::load(None, env(&[("IDEM_RETRY__MAX_ATTEMPTS", "x")])).unwrap_err();
        assert!(format!("{err:#}")
            .contains("IDEM_RETRY__MAX_ATTEMPTS: `retry.max_attempts` must be a whole number"));
        let c = Config::load(None, env(&[("IDEM_HTTP__URLL", "x")])).unwrap();
        assert_eq!(c.warnings.len(), 1);

        let base = Config {
            topics: vec!["t".into()],
            handler: HandlerKind::Http,
            ..Config::default()
        };
        let bad = |f: &dyn Fn(&mut Config), needle: &str| {
            let mut c = base.clone();
            f(&mut c);
            let e = format!("{:#}", c.validate().unwrap_err());
            assert!(e.contains(needle), "{e}");
        };
        type Case = (Box<dyn Fn(&mut Config)>, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|c| c.http.url = "https://app/x".into()), "`http.url` must be an http:// URL"),
            (Box::new(|c| c.http.url = "http://:8080/x".into()), "`http.url` must be an http:// URL"),
            (Box::new(|c| c.http.url = "http://127.0.0.1:0/x".into()), "must name a port between 1 and 65535"),
            (Box::new(|c| c.http.url = "http://127.0.0.1:99999/x".into()), "`http.url` must be an http:// URL"),
            (Box::new(|c| c.http.url = "http://u:SECRETPW@app/x".into()), "must not carry credentials"),
            (Box::new(|c| c.http.url = "http://app/my events".into()), "must not contain spaces"),
            (Box::new(|c| c.http.request_timeout_ms = 0), "`http.request_timeout_ms` must be between 1 and 3600000, got 0"),
            (Box::new(|c| c.http.connect_timeout_ms = 20_000), "`http.connect_timeout_ms` (20000) must be at most `http.request_timeout_ms` (10000)"),
            (Box::new(|c| c.http.max_in_flight = 0), "`http.max_in_flight` must be between 1 and 1024"),
            (Box::new(|c| { c.http.request_timeout_ms = 60_000; c.kafka.insert("max.poll.interval.ms".into(), toml::Value::String("30000".into())); }), "plus 2000 must stay below `kafka.\"max.poll.interval.ms\"` (30000)"),
            (Box::new(|c| c.http.content_type = "a\nb".into()), "`http.content_type` must be \"auto\" or a media type"),
            (Box::new(|c| c.http.content_type = "not a type".into()), "`http.content_type` must be \"auto\" or a media type"),
            (Box::new(|c| c.http.content_type = "".into()), "`http.content_type` must be \"auto\" or a media type"),
            (Box::new(|c| c.http.header_prefix = "X Kafka-".into()), "`http.header_prefix` must be letters, digits and -, end with -"),
            (Box::new(|c| c.http.header_prefix = "".into()), "`http.header_prefix` must be letters, digits and -, end with -"),
            (Box::new(|c| c.http.header_prefix = "Idem-".into()), "`http.header_prefix` must be letters, digits and -, end with -"),
            (Box::new(|c| c.http.header_prefix = "Content-".into()), "`http.header_prefix` must be letters, digits and -, end with -"),
            (Box::new(|c| c.http.header_prefix = "Kafka".into()), "`http.header_prefix` must be letters, digits and -, end with -"),
            (Box::new(|c| c.http.reply_topic = "t".into()), "`http.reply_topic` must differ from the source topics and their dead-letter topics"),
            (Box::new(|c| c.http.reply_topic = "t.dlq".into()), "`http.reply_topic` must differ from the source topics and their dead-letter topics"),
            (Box::new(|c| c.retry.max_delay_ms = 1), "`retry.max_delay_ms` must be between `retry.initial_delay_ms` (200) and 3600000, got 1"),
            (Box::new(|c| c.retry.max_attempts = 0), "`retry.max_attempts` must be between 1 and 1000000"),
            (Box::new(|c| c.metrics.listen = "localhost:9464".into()), "`metrics.listen` must be host:port with a numeric host"),
        ];
        for (f, needle) in &cases {
            bad(f.as_ref(), needle);
        }
        let mut ok = base.clone();
        ok.http.content_type = "application/json; charset=utf-8".into();
        ok.http.url = "http://app.internal:8080/v1/events?src=idem".into();
        ok.validate().unwrap();
        let mut ledger_reply = base.clone();
        ledger_reply.handler = HandlerKind::Ledger;
        ledger_reply.http.reply_topic = "r".into();
        assert!(ledger_reply
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs `handler = \"http\"`"));
        let err = Config::load(None, env(&[("IDEM_RETRY__ON_EXHAUSTED", "skip")])).unwrap_err();
        assert!(format!("{err:#}")
            .contains("unknown variant `skip`, expected `pause` or `dead_letter`"));
    }

    #[test]
    fn kafka_secrets_are_read_from_the_environment_or_a_file_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cr3t-from-file\n").unwrap();
        let mut c = Config {
            topics: vec!["t".into()],
            ..Config::default()
        };
        c.kafka.insert(
            "sasl.password".into(),
            toml::Value::String(format!("${{file:{}}}", secret.display())),
        );
        c.kafka.insert(
            "sasl.username".into(),
            toml::Value::String("${env:IDEM_TEST_SECRET_USER}".into()),
        );
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains("`kafka.\"sasl.username\"` = \"${env:IDEM_TEST_SECRET_USER}\": the environment variable IDEM_TEST_SECRET_USER is not set"), "{err}");
        // SAFETY of the test: no other test reads this variable.
        std::env::set_var("IDEM_TEST_SECRET_USER", "alice");
        c.validate().unwrap();
        let props: BTreeMap<String, String> = c.kafka_properties().unwrap().into_iter().collect();
        assert_eq!(props["sasl.password"], "s3cr3t-from-file");
        assert_eq!(props["sasl.username"], "alice");
        std::fs::remove_file(&secret).unwrap();
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains("cannot read the file"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        c.kafka.remove("sasl.password");
        c.kafka.insert(
            "ssl.key.password".into(),
            toml::Value::String("${vault:x}".into()),
        );
        assert!(format!("{:#}", c.validate().unwrap_err())
            .contains("must be ${env:NAME} or ${file:/path}"));
        c.kafka.insert(
            "ssl.key.password".into(),
            toml::Value::String("${env:HOME".into()),
        );
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("must end with }"));
        // A misspelt property is refused by librdkafka at start-up, and the
        // secret it carries is not echoed.
        c.kafka.clear();
        c.kafka.insert(
            "sasl.pasword".into(),
            toml::Value::String("${env:IDEM_TEST_SECRET_USER}".into()),
        );
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(
            err.contains("`kafka.\"sasl.pasword\"` is refused by librdkafka"),
            "{err}"
        );
        assert!(!err.contains("alice"), "{err}");
    }
}
