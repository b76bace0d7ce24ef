//! Looking into a store: per-bucket sizes, one key's record, what expiry
//! would drop, and a full consistency check. Behind `idem store ...`.
//!
//! Guarantee: everything here reads only, and works on a store opened with
//! [`DedupStore::open_read_only`] beside a running worker (it then sees the
//! store as it was when opened). Sizes are RocksDB's estimates; `verify` reads
//! every record.

use super::{
    decode_record, family, parse_checkpoint_key, rocks, Bucket, DedupStore, StoreError,
    META_BUCKET, META_CF, META_SCHEMA, META_WINDOW, OFFSETS_CF, SCHEMA_VERSION,
};
use crate::proto::{Checkpoint, DedupRecord};
use prost::Message as _;
use serde::Serialize;

/// Size and span of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketStats {
    /// Column family name, `b<start-seconds>`.
    pub name: String,
    /// Start of its span, Unix milliseconds.
    pub start_ms: i64,
    /// End of its span (exclusive), Unix milliseconds.
    pub end_ms: i64,
    /// When it may be dropped, Unix milliseconds.
    pub expires_at_ms: i64,
    /// RocksDB's estimate of the keys in it.
    pub estimated_keys: u64,
    /// Bytes of its SST files on disk.
    pub sst_bytes: u64,
    /// Bytes of its memtables (not yet flushed; also in the WAL).
    pub memtable_bytes: u64,
}

/// What `idem store stats` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Bucket width, seconds.
    pub bucket_secs: i64,
    /// Window, milliseconds.
    pub window_ms: i64,
    /// Every live bucket, oldest first.
    pub buckets: Vec<BucketStats>,
    /// Sum of the buckets' estimated keys.
    pub estimated_keys: u64,
    /// Sum of the buckets' SST and memtable bytes.
    pub bytes: u64,
    /// Bytes of the store directory on disk (what `max_store_bytes` caps).
    pub disk_bytes: u64,
    /// Start of the oldest bucket, Unix milliseconds.
    pub oldest_ms: Option<i64>,
    /// End of the newest bucket, Unix milliseconds.
    pub newest_ms: Option<i64>,
    /// Partition checkpoints: (topic, partition, next offset).
    pub checkpoints: Vec<(String, i32, i64)>,
}

/// What `idem store verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Buckets read.
    pub buckets: u64,
    /// Records read.
    pub records: u64,
    /// Checkpoints read.
    pub checkpoints: u64,
    /// Everything that is wrong, one line each; empty when the store is sound.
    pub problems: Vec<String>,
}

impl DedupStore {
    fn int_property(&self, cf: &str, name: &str) -> Result<u64, StoreError> {
        let db = self.db()?;
        let handle = family(&db, cf)?;
        Ok(db
            .property_int_value_cf(&handle, name)
            .map_err(rocks(format!("read {name} of {cf}")))?
            .unwrap_or(0))
    }

    /// Sizes and spans of every live bucket, and the checkpoints.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut buckets = Vec::new();
        for b in self.live_buckets().into_iter().rev() {
            let name = b.name();
            buckets.push(BucketStats {
                start_ms: b.start_secs * 1000,
                end_ms: b.end_ms(),
                expires_at_ms: b.expires_at_ms(self.opts.window_ms),
                estimated_keys: self.int_property(&name, "rocksdb.estimate-num-keys")?,
                sst_bytes: self.int_property(&name, "rocksdb.total-sst-files-size")?,
                memtable_bytes: self.int_property(&name, "rocksdb.size-all-mem-tables")?,
                name,
            });
        }
        Ok(StoreStats {
            bucket_secs: self.opts.bucket_secs,
            window_ms: self.opts.window_ms,
            estimated_keys: buckets.iter().map(|b| b.estimated_keys).sum(),
            bytes: buckets.iter().map(|b| b.sst_bytes + b.memtable_bytes).sum(),
            disk_bytes: self.size_bytes()?,
            oldest_ms: buckets.first().map(|b| b.start_ms),
            newest_ms: buckets.last().map(|b| b.end_ms),
            buckets,
            checkpoints: self.checkpoints()?,
        })
    }

    /// Every column family's name: buckets, metadata, offsets, handlers.
    fn family_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live_buckets().iter().map(Bucket::name).collect();
        names.extend([META_CF, OFFSETS_CF].map(String::from));
        names.extend(self.opts.handler_cfs.iter().map(|s| s.to_string()));
        names
    }

    /// Bytes of the store directory on disk (SST files, WAL, manifest), as
    /// `du` would count them: what `max_store_bytes` caps.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let entries = std::fs::read_dir(&self.path).map_err(|e| StoreError::Io {
            action: format!("list the store directory {}", self.path.display()),
            cause: e,
        })?;
        Ok(entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum())
    }

    /// Keeps the store under `max_bytes`: with `drop_oldest`, drops the
    /// oldest buckets before their time (never the newest), loudly, and
    /// returns them; otherwise fails with [`StoreError::Full`].
    pub fn enforce_size_cap(
        &self,
        max_bytes: u64,
        drop_oldest: bool,
    ) -> Result<Vec<Bucket>, StoreError> {
        let mut dropped = Vec::new();
        if self.size_bytes()? > max_bytes {
            // Records still only in the WAL: as SST files they are smaller,
            // and dropping a bucket then frees its files.
            self.flush()?;
        }
        loop {
            let bytes = self.size_bytes()?;
            if bytes <= max_bytes {
                return Ok(dropped);
            }
            let live = self.live_buckets();
            if !drop_oldest {
                return Err(StoreError::Full {
                    path: self.path.clone(),
                    bytes,
                    max: max_bytes,
                });
            }
            if live.len() <= 1 {
                return Err(StoreError::FullAtOneBucket {
                    path: self.path.clone(),
                    bytes,
                    max: max_bytes,
                });
            }
            let oldest = live[live.len() - 1];
            let removed = self
                .buckets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&oldest.start_secs);
            if removed {
                self.db()?
                    .drop_cf(&oldest.name())
                    .map_err(rocks(format!("drop bucket {}", oldest.name())))?;
                let remaining = self.live_buckets();
                let effective_window_ms = remaining
                    .last()
                    .map(|b| self.processing_time() - b.start_secs * 1000)
                    .unwrap_or(0);
                tracing::warn!(bucket = %oldest.name(), bytes, max_bytes, effective_window_secs = effective_window_ms / 1000,
                    "store over max_store_bytes: dropped the oldest bucket BEFORE its window ended; keys older than the effective window are forgotten");
                dropped.push(oldest);
            }
        }
    }

    /// The window the last worker on this store ran with, milliseconds
    /// (stores written before it was recorded: `None`).
    pub fn recorded_window_ms(&self) -> Result<Option<i64>, StoreError> {
        let db = self.db()?;
        let meta = family(&db, META_CF)?;
        Ok(db
            .get_cf(&meta, META_WINDOW)
            .map_err(rocks("read the recorded window"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(|b| u64::from_be_bytes(b) as i64))
    }

    /// The window an expiry run from outside the worker must use: never
    /// shorter than the one the last worker ran with, so a command run
    /// without the worker's configuration cannot drop live buckets.
    pub fn expiry_window_ms(&self, configured_ms: i64) -> Result<i64, StoreError> {
        Ok(self.recorded_window_ms()?.unwrap_or(0).max(configured_ms))
    }

    /// True when `bucket` is past the window at `now_ms`: a lookup no longer
    /// consults it, even before it is dropped.
    pub fn is_expired(&self, bucket: &Bucket, now_ms: i64) -> bool {
        bucket.expires_at_ms(self.opts.window_ms) <= now_ms
    }

    /// Buckets that [`DedupStore::expire`] would drop at `now_ms`.
    pub fn expired_buckets(&self, now_ms: i64) -> Vec<Bucket> {
        self.live_buckets()
            .into_iter()
            .filter(|b| b.expires_at_ms(self.opts.window_ms) <= now_ms)
            .collect()
    }

    /// The record of `key` and the bucket holding it, newest bucket first,
    /// including buckets expired but not yet dropped (an inspection shows
    /// what is on disk).
    pub fn find(
        &self,
        key: &crate::key::ScopedKeyHash,
    ) -> Result<Option<(Bucket, DedupRecord)>, StoreError> {
        let db = self.db()?;
        for bucket in self.live_buckets() {
            let Some(cf) = db.cf_handle(&bucket.name()) else {
                continue;
            };
            let found = db
                .get_pinned_cf(&cf, key.0)
                .map_err(rocks("look up a key"))?;
            if let Some(bytes) = found {
                return Ok(Some((bucket, decode_record(&bytes)?)));
            }
        }
        Ok(None)
    }

    /// Reads everything: metadata, every record of every bucket, every
    /// checkpoint. Problems are collected, not raised, so one run lists them
    /// all; a RocksDB read error is raised.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let db = self.db()?;
        let mut report = VerifyReport::default();
        let meta = family(&db, META_CF)?;
        // A metadata value as u64; what is missing, unreadable or malformed
        // is a problem to list, not a stop.
        let mut meta_u64 = |k: &[u8], label: &str| -> Option<u64> {
            let problem = match db.get_cf(&meta, k) {
                Err(e) => format!("meta: {label} cannot be read: {e}"),
                Ok(None) => format!("meta: no {label}"),
                Ok(Some(v)) => match <[u8; 8]>::try_from(v.as_slice()) {
                    Ok(b) => return Some(u64::from_be_bytes(b)),
                    Err(_) => format!("meta: {label} is {} bytes, not 8", v.len()),
                },
            };
            report.problems.push(problem);
            None
        };
        let schema = meta_u64(META_SCHEMA, "schema version");
        let width = meta_u64(META_BUCKET, "bucket width");
        if let Some(v) = schema.filter(|v| *v != SCHEMA_VERSION) {
            report.problems.push(format!(
                "meta: schema version {v}, this idem reads {SCHEMA_VERSION}"
            ));
        }
        if let Some(w) = width.filter(|w| *w as i64 != self.opts.bucket_secs) {
            report.problems.push(format!(
                "meta: bucket width {w}s differs from the width in use ({}s)",
                self.opts.bucket_secs
            ));
        }
        drop(meta);
        for b in self.live_buckets() {
            report.buckets += 1;
            if b.start_secs % self.opts.bucket_secs != 0 {
                report.problems.push(format!(
                    "bucket {}: start is not a multiple of the width {}s",
                    b.name(),
                    self.opts.bucket_secs
                ));
            }
            let Some(cf) = db.cf_handle(&b.name()) else {
                continue;
            };
            for item in db.iterator_cf_opt(
                &cf,
                super::bucket_scan_options(),
                rocksdb::IteratorMode::Start,
            ) {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => {
                        report
                            .problems
                            .push(format!("bucket {}: RocksDB cannot read it: {e}", b.name()));
                        break;
                    }
                };
                report.records += 1;
                if k.len() != 16 {
                    report.problems.push(format!(
                        "bucket {}: key of {} bytes (expected 16)",
                        b.name(),
                        k.len()
                    ));
                }
                match DedupRecord::decode(v.as_ref()) {
                    Err(e) => report.problems.push(format!(
                        "bucket {}: record {} does not decode: {e}",
                        b.name(),
                        hex::encode(&k)
                    )),
                    Ok(r) if r.fingerprint.len() != 16 => report.problems.push(format!(
                        "bucket {}: record {} has a {}-byte fingerprint",
                        b.name(),
                        hex::encode(&k),
                        r.fingerprint.len()
                    )),
                    Ok(_) => {}
                }
            }
        }
        let offsets = family(&db, OFFSETS_CF)?;
        for item in db.iterator_cf(&offsets, rocksdb::IteratorMode::Start) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    report
                        .problems
                        .push(format!("offsets: RocksDB cannot read them: {e}"));
                    break;
                }
            };
            report.checkpoints += 1;
            let Some((topic, partition)) = parse_checkpoint_key(&k) else {
                report.problems.push(format!(
                    "offsets: key {} is not topic + partition",
                    hex::encode(&k)
                ));
                continue;
            };
            match Checkpoint::decode(v.as_ref()) {
                Err(e) => report.problems.push(format!(
                    "offsets: checkpoint of {topic}/{partition} does not decode: {e}"
                )),
                Ok(c) if c.next_offset < 0 => report.problems.push(format!(
                    "offsets: checkpoint of {topic}/{partition} is negative ({})",
                    c.next_offset
                )),
                Ok(_) => {}
            }
        }
        Ok(report)
    }

    /// The SST files of `bucket` on disk now (a dropped bucket's files are
    /// deleted once no read holds them).
    pub fn sst_files(&self, bucket: &Bucket) -> Result<Vec<std::path::PathBuf>, StoreError> {
        let name = bucket.name();
        let db = self.db()?;
        Ok(db
            .live_files()
            .map_err(rocks("list the store's files"))?
            .into_iter()
            .filter(|f| f.column_family_name == name)
            .map(|f| self.path.join(f.name.trim_start_matches('/')))
            .collect())
    }

    /// Writes memtables to SST files, so sizes on disk are final (backups,
    /// inspection, tests of disk use).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        for name in self.family_names() {
            if let Some(cf) = db.cf_handle(&name) {
                db.flush_cf(&cf)
                    .map_err(rocks(format!("flush column family {name}")))?;
            }
        }
        Ok(())
    }
}

/// Milliseconds as an RFC 3339 UTC time, for tables.
pub fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

impl StoreStats {
    /// The stats as a table for people.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "bucket width {}s, window {}s, {} live buckets",
            self.bucket_secs,
            self.window_ms / 1000,
            self.buckets.len()
        );
        let _ = writeln!(
            s,
            "{:<14} {:<22} {:<22} {:>12} {:>14}",
            "BUCKET", "START", "EXPIRES", "KEYS (est.)", "BYTES"
        );
        for b in &self.buckets {
            let _ = writeln!(
                s,
                "{:<14} {:<22} {:<22} {:>12} {:>14}",
                b.name,
                format_ms(b.start_ms),
                format_ms(b.expires_at_ms),
                b.estimated_keys,
                b.sst_bytes + b.memtable_bytes
            );
        }
        let _ = writeln!(
            s,
            "{:<14} {:<22} {:<22} {:>12} {:>14}",
            "total", "", "", self.estimated_keys, self.bytes
        );
        let _ = writeln!(s, "store directory on disk: {} bytes", self.disk_bytes);
        if let (Some(o), Some(n)) = (self.oldest_ms, self.newest_ms) {
            let _ = writeln!(s, "oldest {} .. newest {}", format_ms(o), format_ms(n));
        }
        for (t, p, n) in &self.checkpoints {
            let _ = writeln!(s, "checkpoint {t}/{p}: next offset {n}");
        }
        s
    }
}
