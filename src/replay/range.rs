//! Where a replay starts and stops: `earliest`, `latest`, an RFC 3339 time,
//! or explicit `partition:offset` pairs.
//!
//! Guarantee: a range is resolved once, against the broker's watermarks at the
//! start of the replay, so a replay of a live topic ends instead of chasing
//! new messages; the end is exclusive (`--to 0:100` replays offsets below 100).
//! A partition not named in a `partition:offset` list starts at its earliest
//! offset (`--from`) or ends at its latest (`--to`).

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

/// One end of a replay range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Position {
    /// The first offset still on the broker (`earliest`).
    #[default]
    Earliest,
    /// The log-end offset at the start of the replay (`latest`).
    Latest,
    /// The first message whose timestamp is at or after this Unix time in
    /// milliseconds.
    Time(i64),
    /// Explicit offsets per partition.
    Offsets(BTreeMap<i32, i64>),
}

impl FromStr for Position {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "earliest" | "beginning" => return Ok(Position::Earliest),
            "latest" | "end" => return Ok(Position::Latest),
            _ => {}
        }
        if let Ok(t) =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        {
            let ms = t.unix_timestamp_nanos() / 1_000_000;
            if ms < 0 {
                bail!("{s:?} is before 1970-01-01T00:00:00Z; Kafka timestamps start there");
            }
            return Ok(Position::Time(ms as i64));
        }
        if s.contains(':') && !s.contains('T') {
            let mut offsets = BTreeMap::new();
            for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (p, o) = pair
                    .split_once(':')
                    .with_context(|| format!("{pair:?} is not partition:offset"))?;
                let p: i32 = p
                    .parse()
                    .with_context(|| format!("{p:?} in {pair:?} is not a partition number"))?;
                let o: i64 = o
                    .parse()
                    .with_context(|| format!("{o:?} in {pair:?} is not an offset"))?;
                if p < 0 || o < 0 {
                    bail!("{pair:?}: partitions and offsets are never negative");
                }
                if offsets.insert(p, o).is_some() {
                    bail!("partition {p} is named twice");
                }
            }
            if !offsets.is_empty() {
                return Ok(Position::Offsets(offsets));
            }
        }
        bail!(
            "expected `earliest`, `latest`, an RFC 3339 time such as 2026-12-01T00:00:00Z, \
             or partition:offset pairs such as 0:100,3:42; got {s:?}"
        )
    }
}

/// The offsets one partition is replayed over: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartitionRange {
    /// The partition.
    pub partition: i32,
    /// First offset replayed.
    pub start: i64,
    /// First offset not replayed.
    pub end: i64,
}

impl Position {
    /// The partitions an offset list names (none for the other positions).
    pub fn named_partitions(&self) -> Vec<i32> {
        match self {
            Position::Offsets(m) => m.keys().copied().collect(),
            _ => Vec::new(),
        }
    }
}

/// Checks that `from` and `to` fit together and name only partitions that
/// are replayed: `partitions` (when given), or `0..count` (when known).
pub fn check_bounds(
    from: &Position,
    to: &Position,
    partitions: Option<&[i32]>,
    count: Option<i32>,
) -> anyhow::Result<()> {
    for (flag, pos) in [("--from", from), ("--to", to)] {
        for p in pos.named_partitions() {
            if count.is_some_and(|n| p >= n) {
                bail!(
                    "{flag} names partition {p}, but the topic has {} partitions (0..={})",
                    count.unwrap_or(0),
                    count.unwrap_or(0) - 1
                );
            }
            if partitions.is_some_and(|ps| !ps.contains(&p)) {
                bail!("{flag} names partition {p}, which --partitions leaves out");
            }
        }
    }
    match (from, to) {
        (Position::Offsets(f), Position::Offsets(t)) => {
            for (p, start) in f {
                if let Some(end) = t.get(p) {
                    if start > end {
                        bail!("--from {p}:{start} is after --to {p}:{end}");
                    }
                }
            }
        }
        (Position::Time(f), Position::Time(t)) if f > t => {
            bail!("--from is a later time than --to");
        }
        (Position::Latest, Position::Earliest) => {
            bail!("--from latest --to earliest is an empty range");
        }
        _ => {}
    }
    Ok(())
}

/// How long broker queries of the range may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves `from` and `to` for the `partitions` of `topic` against the
/// broker's current watermarks.
pub fn resolve<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    from: &Position,
    to: &Position,
) -> anyhow::Result<Vec<PartitionRange>> {
    let mut watermarks = BTreeMap::new();
    for &p in partitions {
        let w = consumer
            .fetch_watermarks(topic, p, QUERY_TIMEOUT)
            .with_context(|| format!("reading the watermarks of {topic}/{p}"))?;
        watermarks.insert(p, w);
    }
    let starts = offsets_at(consumer, topic, &watermarks, from, true)?;
    let ends = offsets_at(consumer, topic, &watermarks, to, false)?;
    Ok(partitions
        .iter()
        .map(|&p| {
            let start = starts[&p];
            PartitionRange {
                partition: p,
                start,
                end: ends[&p].max(start),
            }
        })
        .collect())
}

fn offsets_at<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    watermarks: &BTreeMap<i32, (i64, i64)>,
    at: &Position,
    is_start: bool,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    if let Position::Time(ms) = at {
        let mut tpl = TopicPartitionList::new();
        for &p in watermarks.keys() {
            tpl.add_partition_offset(topic, p, Offset::Offset(*ms))
                .with_context(|| format!("asking for the offset of {topic}/{p} at a time"))?;
        }
        let found = consumer
            .offsets_for_times(tpl, QUERY_TIMEOUT)
            .with_context(|| format!("looking up offsets of {topic} by time"))?;
        for (&p, &(_, high)) in watermarks {
            let o = match found.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // No message at or after that time.
                _ => high,
            };
            out.insert(p, o);
        }
        return Ok(out);
    }
    for (&p, &(low, high)) in watermarks {
        let o = match at {
            Position::Earliest => low,
            Position::Latest => high,
            Position::Offsets(m) => match m.get(&p) {
                Some(&o) => o.clamp(low, high),
                None if is_start => low,
                None => high,
            },
            Position::Time(_) => unreachable!("handled above"),
        };
        out.insert(p, o);
    }
    Ok(out)
}

/// The same range applied to messages read from a dump file, where there are
/// no watermarks: a message is in range when it is at or after `from` and
/// before `to`. A message without a timestamp passes a time bound.
#[derive(Debug, Clone, Default)]
pub struct FileFilter {
    /// Start of the range.
    pub from: Position,
    /// End of the range (exclusive).
    pub to: Option<Position>,
    /// Partitions kept; all when `None`.
    pub partitions: Option<Vec<i32>>,
    /// Topic kept; all when `None`.
    pub topic: Option<String>,
}

impl FileFilter {
    /// True when `msg` is inside the range.
    pub fn keeps(&self, msg: &OwnedMessage) -> bool {
        if self.topic.as_deref().is_some_and(|t| t != msg.topic()) {
            return false;
        }
        if let Some(ps) = &self.partitions {
            if !ps.contains(&msg.partition()) {
                return false;
            }
        }
        let ts = msg.timestamp().to_millis();
        let after_from = match &self.from {
            Position::Earliest => true,
            Position::Latest => false,
            Position::Time(t) => ts.is_none_or(|ts| ts >= *t),
            Position::Offsets(m) => m.get(&msg.partition()).is_none_or(|o| msg.offset() >= *o),
        };
        let before_to = match &self.to {
            None | Some(Position::Latest) => true,
            Some(Position::Earliest) => false,
            Some(Position::Time(t)) => ts.is_none_or(|ts| ts < *t),
            Some(Position::Offsets(m)) => m.get(&msg.partition()).is_none_or(|o| msg.offset() < *o),
        };
        after_from && before_to
    }
}

/// Parses `--partitions 0,3,5`.
pub fn parse_partitions(s: &str) -> anyhow::Result<Vec<i32>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: i32 = part.parse().ok().filter(|p| *p >= 0).with_context(|| {
            format!("--partitions: {part:?} is not a partition number (0, 1, 2, ...)")
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("--partitions: name at least one partition, such as 0,3");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("earliest".parse::<Position>().unwrap(), Position::Earliest);
        assert_eq!("latest".parse::<Position>().unwrap(), Position::Latest);
        assert_eq!(
            "2026-12-01T00:00:00Z".parse::<Position>().unwrap(),
            Position::Time(1_796_083_200_000)
        );
        assert_eq!(
            "2026-12-01T01:00:00+01:00".parse::<Position>().unwrap(),
            Position::Time(1_796_083_200_000)
        );
        assert_eq!(
            "0:100, 3:42".parse::<Position>().unwrap(),
            Position::Offsets([(0, 100), (3, 42)].into_iter().collect())
        );
        let err = "yesterday".parse::<Position>().unwrap_err().to_string();
        assert!(err.contains("expected `earliest`, `latest`, an RFC 3339 time"));
        assert!(err.ends_with("got \"yesterday\""));
        assert!("0:x".parse::<Position>().is_err());
        assert!("0:1,0:2".parse::<Position>().is_err());
        assert!("-1:5".parse::<Position>().is_err());
    }

    #[test]
    fn bounds_name_only_replayed_partitions_and_run_forwards() {
        let p = |s: &str| s.parse::<Position>().unwrap();
        assert!(check_bounds(&p("0:5"), &p("0:9"), Some(&[0]), Some(3)).is_ok());
        let e = check_bounds(&p("7:0"), &Position::Latest, None, Some(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--from names partition 7, but the topic has 3 partitions (0..=2)"
        );
        let e = check_bounds(&p("0:5"), &Position::Latest, Some(&[1]), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--from names partition 0, which --partitions leaves out"
        );
        let e = check_bounds(&p("0:8"), &p("0:5"), None, None).unwrap_err();
        assert_eq!(e.to_string(), "--from 0:8 is after --to 0:5");
        assert!("1969-12-31T23:59:59Z".parse::<Position>().is_err());
    }

    #[test]
    fn partitions_parse() {
        assert_eq!(parse_partitions("0,3, 3").unwrap(), vec![0, 3]);
        assert!(parse_partitions("a")
            .unwrap_err()
            .to_string()
            .contains("not a partition number"));
        assert!(parse_partitions(",").is_err());
    }
}
