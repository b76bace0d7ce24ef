//! Time buckets: the column families `b<unix-seconds>` that hold dedup records.
//!
//! Guarantee: a record first seen at time `t` lands in the bucket whose span
//! contains `t`, and that bucket is expired only once its *end* is at least
//! `window` in the past, so every key is remembered for at least `window`.

/// Prefix of every bucket column family name.
pub const BUCKET_PREFIX: char = 'b';

/// One time slice of the dedup store, named by its start in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket {
    /// Start of the span, Unix seconds, a multiple of the width.
    pub start_secs: i64,
    /// Width of the span in seconds.
    pub width_secs: i64,
}

impl Bucket {
    /// The bucket of width `width_secs` that contains `time_ms`.
    pub fn containing(time_ms: i64, width_secs: i64) -> Self {
        let secs = time_ms.div_euclid(1000);
        Self {
            start_secs: secs - secs.rem_euclid(width_secs),
            width_secs,
        }
    }

    /// Parses a column family name; `None` for names that are not buckets.
    pub fn parse(name: &str, width_secs: i64) -> Option<Self> {
        let digits = name.strip_prefix(BUCKET_PREFIX)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let start_secs = digits.parse().ok()?;
        Some(Self {
            start_secs,
            width_secs,
        })
    }

    /// The column family name, `b<start-seconds>`.
    pub fn name(&self) -> String {
        format!("{BUCKET_PREFIX}{}", self.start_secs)
    }

    /// End of the span (exclusive), Unix milliseconds.
    pub fn end_ms(&self) -> i64 {
        (self.start_secs + self.width_secs) * 1000
    }

    /// When the bucket may be dropped: its end plus the window.
    pub fn expires_at_ms(&self, window_ms: i64) -> i64 {
        self.end_ms() + window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containing_aligns_to_width_and_names_round_trip() {
        let b = Bucket::containing(7_199_999, 3600);
        assert_eq!(b.start_secs, 3600);
        assert_eq!(b.name(), "b3600");
        assert_eq!(Bucket::parse("b3600", 3600), Some(b));
        assert_eq!(Bucket::parse("ledger", 3600), None);
        assert_eq!(Bucket::parse("b", 3600), None);
        assert_eq!(Bucket::parse("b-5", 3600), None);
    }

    #[test]
    fn a_bucket_expires_only_a_full_window_after_its_end() {
        let b = Bucket::containing(0, 3600);
        let day = 86_400_000;
        assert_eq!(b.expires_at_ms(day), 3_600_000 + day);
    }
}
