//! What a replay found: counts per partition and in total, and the first few
//! examples of each outcome, as a table for people and JSON for scripts.
//!
//! Guarantee: every message the replay read is counted in exactly one outcome
//! (`messages = new + duplicates + conflicts + dead_lettered`), per partition
//! and in total; `unkeyed` is a detail of those, not an outcome of its own.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// How many examples of each outcome a report keeps.
pub const EXAMPLES_PER_OUTCOME: usize = 5;

/// What happens (or would happen) to one replayed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// Its key is not in the store: it reaches the handler (with `--apply`
    /// it did, and was handled).
    New,
    /// Its key is in the store with the same payload: a no-op.
    Duplicate,
    /// Its key is in the store with another payload: dead-lettered again.
    Conflict,
    /// The payload does not decode: dead-lettered again.
    Undecodable,
    /// A null payload: dead-lettered again.
    Tombstone,
    /// No usable key: dead-lettered again.
    BadKey,
    /// With `--apply`: new, and the handler refused it (dead-lettered).
    Rejected,
}

impl ReplayOutcome {
    /// The name used in the table and the JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
            Self::Undecodable => "undecodable",
            Self::Tombstone => "tombstone",
            Self::BadKey => "bad_key",
            Self::Rejected => "rejected",
        }
    }
}

/// Counts of one partition or of the whole replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayCounts {
    /// Messages read.
    pub messages: u64,
    /// Would reach the handler (dry run) or were handled (`--apply`).
    pub new: u64,
    /// No-ops: key seen with the same payload.
    pub duplicates: u64,
    /// Key seen with another payload.
    pub conflicts: u64,
    /// Dead-lettered for what they are: undecodable + tombstones + bad keys +
    /// rejected.
    pub dead_lettered: u64,
    /// Payloads that do not decode.
    pub undecodable: u64,
    /// Null payloads.
    pub tombstones: u64,
    /// Messages without a usable key.
    pub bad_keys: u64,
    /// Handler refusals (`--apply` only).
    pub rejected: u64,
    /// Messages keyed by topic/partition/offset (a detail of the outcomes).
    pub unkeyed: u64,
}

impl ReplayCounts {
    fn add(&mut self, outcome: ReplayOutcome, unkeyed: bool) {
        self.messages += 1;
        self.unkeyed += u64::from(unkeyed);
        match outcome {
            ReplayOutcome::New => self.new += 1,
            ReplayOutcome::Duplicate => self.duplicates += 1,
            ReplayOutcome::Conflict => self.conflicts += 1,
            ReplayOutcome::Undecodable => self.undecodable += 1,
            ReplayOutcome::Tombstone => self.tombstones += 1,
            ReplayOutcome::BadKey => self.bad_keys += 1,
            ReplayOutcome::Rejected => self.rejected += 1,
        }
        if matches!(
            outcome,
            ReplayOutcome::Undecodable
                | ReplayOutcome::Tombstone
                | ReplayOutcome::BadKey
                | ReplayOutcome::Rejected
        ) {
            self.dead_lettered += 1;
        }
    }

    /// Messages that reach (or would reach) the handler.
    pub fn handler_calls(&self) -> u64 {
        self.new + self.rejected
    }
}

/// One message given as an example of its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The idempotency key as text (lossy for binary keys), when it has one.
    pub key: Option<String>,
    /// For duplicates and conflicts: where the first copy was recorded.
    pub first_seen: Option<String>,
}

/// One partition's part of the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionReport {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// First offset of the range (from a dump: the lowest offset read).
    pub from_offset: Option<i64>,
    /// First offset past the range (from a dump: the highest offset read + 1).
    pub to_offset: Option<i64>,
    /// Its counts.
    pub counts: ReplayCounts,
}

/// The whole report of one replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// `kafka:<topic>` or `file:<path>`.
    pub source: String,
    /// True when new messages went through the handler (`--apply`).
    pub applied: bool,
    /// Per partition, in topic and partition order.
    pub partitions: Vec<PartitionReport>,
    /// The sum of the partitions.
    pub total: ReplayCounts,
    /// The first few examples of each outcome.
    pub examples: BTreeMap<ReplayOutcome, Vec<Example>>,
    /// True when no message reaches (or would reach) the handler.
    pub no_op: bool,
}

/// Builds a [`ReplayReport`] one message at a time.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    report: ReplayReport,
    index: BTreeMap<(String, i32), usize>,
    /// Partitions whose range was declared up front (read from Kafka).
    declared: BTreeSet<usize>,
}

impl ReportBuilder {
    /// A builder for a replay of `source`.
    pub fn new(source: String, applied: bool) -> Self {
        Self {
            report: ReplayReport {
                source,
                applied,
                ..ReplayReport::default()
            },
            index: BTreeMap::new(),
            declared: BTreeSet::new(),
        }
    }

    /// Declares a partition's range before any of its messages, so that an
    /// empty range still shows.
    pub fn declare(&mut self, topic: &str, partition: i32, from: i64, to: i64) {
        let i = self.slot(topic, partition);
        self.declared.insert(i);
        let p = &mut self.report.partitions[i];
        p.from_offset = Some(from);
        p.to_offset = Some(to);
    }

    fn slot(&mut self, topic: &str, partition: i32) -> usize {
        let key = (topic.to_string(), partition);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.report.partitions.push(PartitionReport {
            topic: topic.to_string(),
            partition,
            ..PartitionReport::default()
        });
        let i = self.report.partitions.len() - 1;
        self.index.insert(key, i);
        i
    }

    /// True while fewer than [`EXAMPLES_PER_OUTCOME`] examples of `outcome`
    /// are kept, so callers can skip the work of describing the rest.
    pub fn wants_example(&self, outcome: ReplayOutcome) -> bool {
        self.report
            .examples
            .get(&outcome)
            .is_none_or(|l| l.len() < EXAMPLES_PER_OUTCOME)
    }

    /// Counts one message.
    pub fn add(&mut self, outcome: ReplayOutcome, unkeyed: bool, example: Example) {
        let i = self.slot(&example.topic, example.partition);
        let declared = self.declared.contains(&i);
        let p = &mut self.report.partitions[i];
        p.counts.add(outcome, unkeyed);
        if !declared {
            // From a dump: the range is what was read.
            let o = example.offset;
            p.from_offset = Some(p.from_offset.map_or(o, |f| f.min(o)));
            p.to_offset = Some(p.to_offset.map_or(o + 1, |t| t.max(o + 1)));
        }
        self.report.total.add(outcome, unkeyed);
        let list = self.report.examples.entry(outcome).or_default();
        if list.len() < EXAMPLES_PER_OUTCOME {
            list.push(example);
        }
    }

    /// The finished report, partitions in topic and partition order.
    pub fn finish(mut self) -> ReplayReport {
        self.report
            .partitions
            .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        self.report.no_op = self.report.total.handler_calls() == 0;
        self.report
    }
}

impl ReplayReport {
    /// The report as a table for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mode = if self.applied {
            "applied: new messages went through the handler"
        } else {
            "dry run: nothing written, nothing produced"
        };
        let _ = writeln!(s, "replay of {} ({mode})", self.source);
        let new_label = if self.applied { "HANDLED" } else { "NEW" };
        let _ = writeln!(
            s,
            "{:<28} {:>17} {:>9} {:>8} {:>10} {:>9} {:>13} {:>8}",
            "TOPIC/PARTITION",
            "OFFSETS",
            "MESSAGES",
            new_label,
            "DUPLICATE",
            "CONFLICT",
            "DEAD-LETTERED",
            "UNKEYED"
        );
        let row = |s: &mut String, name: &str, range: &str, c: &ReplayCounts| {
            let _ = writeln!(
                s,
                "{:<28} {:>17} {:>9} {:>8} {:>10} {:>9} {:>13} {:>8}",
                name,
                range,
                c.messages,
                c.new,
                c.duplicates,
                c.conflicts,
                c.dead_lettered,
                c.unkeyed
            );
        };
        for p in &self.partitions {
            let range = match (p.from_offset, p.to_offset) {
                (Some(f), Some(t)) => format!("{f}..{t}"),
                _ => "-".into(),
            };
            row(
                &mut s,
                &format!("{}/{}", p.topic, p.partition),
                &range,
                &p.counts,
            );
        }
        row(&mut s, "total", "", &self.total);
        let t = &self.total;
        if t.dead_lettered > 0 {
            let _ = writeln!(
                s,
                "dead-lettered: {} undecodable, {} tombstones, {} without a usable key, {} rejected by the handler",
                t.undecodable, t.tombstones, t.bad_keys, t.rejected
            );
        }
        for (outcome, list) in &self.examples {
            if *outcome == ReplayOutcome::Duplicate {
                continue;
            }
            let _ = writeln!(s, "first {} of {}:", outcome.as_str(), list.len());
            for e in list {
                let _ = write!(s, "  {}/{}@{}", e.topic, e.partition, e.offset);
                if let Some(k) = &e.key {
                    let _ = write!(s, " key={k:?}");
                }
                if let Some(f) = &e.first_seen {
                    let _ = write!(s, " first seen at {f}");
                }
                s.push('\n');
            }
        }
        let n = t.handler_calls();
        let messages = if n == 1 { "message" } else { "messages" };
        let verdict = if t.messages == 0 {
            "nothing was read: the range, topic or partitions matched no message, so nothing is proven".to_string()
        } else if self.no_op {
            "no-op: no message reaches the handler".to_string()
        } else if self.applied {
            format!("{n} {messages} went through the handler")
        } else {
            format!("NOT a no-op: {n} {messages} would reach the handler")
        };
        let _ = writeln!(s, "verdict: {verdict}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: i32, o: i64) -> Example {
        Example {
            topic: "t".into(),
            partition: p,
            offset: o,
            key: Some(format!("k{o}")),
            first_seen: None,
        }
    }

    #[test]
    fn every_message_lands_in_one_outcome_and_examples_are_capped() {
        let mut b = ReportBuilder::new("kafka:t".into(), false);
        b.declare("t", 1, 0, 0);
        b.declare("t", 0, 0, 10);
        for o in 0..8 {
            b.add(ReplayOutcome::Duplicate, false, ex(0, o));
        }
        b.add(ReplayOutcome::New, true, ex(0, 8));
        b.add(ReplayOutcome::Tombstone, false, ex(0, 9));
        let r = b.finish();
        assert_eq!(r.total.messages, 10);
        assert_eq!(
            r.total.new + r.total.duplicates + r.total.conflicts + r.total.dead_lettered,
            10
        );
        assert_eq!((r.total.unkeyed, r.total.tombstones), (1, 1));
        assert_eq!(
            r.examples[&ReplayOutcome::Duplicate].len(),
            EXAMPLES_PER_OUTCOME
        );
        assert_eq!(r.partitions.len(), 2);
        assert_eq!(
            (r.partitions[0].from_offset, r.partitions[0].to_offset),
            (Some(0), Some(10))
        );
        assert_eq!(r.partitions[1].counts.messages, 0);
        assert!(!r.no_op);
        let table = r.render();
        assert!(table.contains("NOT a no-op: 1 message would reach the handler"));
        assert!(table.contains("t/0@8 key=\"k8\""));
    }
}
