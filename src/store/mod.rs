//! The RocksDB dedup store: one database per worker holding the dedup records
//! in time-bucket column families, the partition checkpoints, and the state of
//! in-process handlers.
//!
//! Guarantees:
//! - [`DedupStore::commit`] is atomic and durable: one `WriteBatch`, WAL
//!   synced, carrying records, checkpoints, handler state and the clock's
//!   high-water mark together.
//! - A key recorded at processing time `t` is found by [`DedupStore::lookup`]
//!   until at least `t + window`: buckets are dropped whole, and only once
//!   their end is a full window old.
//! - Processing time never runs backwards, across restarts too: the clock's
//!   high-water mark is persisted and a clock that jumps back is clamped.
//! - A lookup racing a bucket drop never crashes: it holds a reference to the
//!   column family for the duration of the read.

mod batch;
mod behind;
mod bucket;
pub mod inspect;

pub use batch::{CheckpointAt, FastMap, HandlerTxn, Staged, StoreBatch};
pub use bucket::Bucket;
pub use inspect::{BucketStats, StoreStats, VerifyReport};

use crate::clock::Clock;
use crate::key::ScopedKeyHash;
use crate::proto::{Checkpoint, CheckpointMark, DedupRecord};
use prost::Message as _;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBWithThreadMode, MultiThreaded, Options,
    WriteBatch, WriteOptions,
};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Column family for fixed-name metadata.
pub const META_CF: &str = "meta";
/// Column family for partition checkpoints.
pub const OFFSETS_CF: &str = "offsets";
/// The on-disk layout version this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const META_BUCKET: &[u8] = b"bucket_secs";
const META_HWM: &[u8] = b"clock_high_water_ms";
const META_WINDOW: &[u8] = b"window_ms";

type Db = DBWithThreadMode<MultiThreaded>;

/// A raw key and value of a handler column family.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Errors of the dedup store. Callers match on them to decide between
/// failing closed and asking the operator to act.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused an operation.
    #[error("RocksDB error while trying to {action}: {cause}")]
    Rocks {
        /// What was being attempted.
        action: String,
        /// The RocksDB error (in the message, not a `source`, so that error
        /// chains print it once).
        cause: rocksdb::Error,
    },
    /// The store was written with another bucket width.
    #[error(
        "the store at {path} was created with bucket_secs = {stored} but the configuration says \
         bucket_secs = {configured}; set `bucket_secs` back to {stored}, or move the store directory \
         away to start a fresh one (its keys will then be forgotten)"
    )]
    BucketWidthChanged {
        /// Store directory.
        path: PathBuf,
        /// Width in the store.
        stored: i64,
        /// Width configured.
        configured: i64,
    },
    /// The store was written by a newer layout.
    #[error("the store at {path} has schema version {found}; this idem reads version {supported}")]
    SchemaVersion {
        /// Store directory.
        path: PathBuf,
        /// Version found.
        found: u64,
        /// Version supported.
        supported: u64,
    },
    /// The directory has store files but no `CURRENT`.
    #[error("the store at {0} is damaged: it has RocksDB files but no CURRENT file; restore it from a backup (idem will not create a new store over it)")]
    Damaged(PathBuf),
    /// A new store would be created among other files.
    #[error(
        "{0} is not empty and holds no idem store; give an empty or new directory as `store_dir`"
    )]
    NotEmpty(PathBuf),
    /// The directory holds no store.
    #[error("no idem store at {0} (no RocksDB database there): check `store_dir` / --store-dir")]
    NotAStore(PathBuf),
    /// A stored value does not decode.
    #[error("corrupt {what} in the store: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// A file-system operation on the store directory failed.
    #[error("could not {action}: {cause}")]
    Io {
        /// What was being attempted.
        action: String,
        /// The error (in the message, not a `source`).
        cause: std::io::Error,
    },
    /// Over `max_store_bytes` with only the current bucket left to drop.
    #[error(
        "the store at {path} holds {bytes} bytes, over max_store_bytes = {max}, with only the current \
         bucket left (on_store_full = \"drop_oldest\" never drops it); nothing more is handled: raise \
         max_store_bytes or narrow bucket_secs"
    )]
    FullAtOneBucket {
        /// Store directory.
        path: PathBuf,
        /// Its size now.
        bytes: u64,
        /// The cap.
        max: u64,
    },
    /// The store is over `max_store_bytes` and the policy is to fail closed.
    #[error(
        "the store at {path} holds {bytes} bytes, over max_store_bytes = {max}; nothing more is \
         handled until it shrinks: raise max_store_bytes, shorten window_secs, or set \
         on_store_full = \"drop_oldest\" to forget the oldest keys early"
    )]
    Full {
        /// Store directory.
        path: PathBuf,
        /// Its size now.
        bytes: u64,
        /// The cap.
        max: u64,
    },
    /// A handler column family that was not declared at open.
    #[error("column family `{0}` was not opened; handlers must declare their column families")]
    UnknownColumnFamily(String),
    /// The database is closed: a reopen after a failed write is running or
    /// failed, and is tried again.
    #[error("the dedup store at {} is closed after a failure and not reopened yet", .0.display())]
    Closed(PathBuf),
    /// A batch handed over to be written behind (`overlap_wal_sync`) could
    /// not be written, or the writing thread stopped before it: nothing
    /// after it may be taken as written.
    #[error("a batch handed over to the store's writing thread was not written (an earlier write failed, or the worker is stopping): the batches since the last one written are not in the store")]
    NotWrittenBehind,
}

impl StoreError {
    /// True for failures that may pass by themselves (a full disk, a
    /// read-only or unreachable filesystem, an I/O error), for which the
    /// worker waits and retries; false for a store that is damaged or not
    /// the one configured, which needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Rocks { cause, .. } => matches!(
                cause.kind(),
                rocksdb::ErrorKind::IOError
                    | rocksdb::ErrorKind::Busy
                    | rocksdb::ErrorKind::TimedOut
                    | rocksdb::ErrorKind::TryAgain
                    | rocksdb::ErrorKind::Aborted
                    | rocksdb::ErrorKind::Incomplete
            ),
            StoreError::Io { .. }
            | StoreError::Closed(_)
            | StoreError::Full { .. }
            | StoreError::FullAtOneBucket { .. } => true,
            _ => false,
        }
    }
}

/// The error of a failed RocksDB call, saying what was attempted. The
/// action becomes a `String` only when the call failed: a `&'static str`
/// costs nothing on the way that succeeds (lookups call this per key).
fn rocks(action: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> StoreError {
    move |cause| StoreError::Rocks {
        action: action.into(),
        cause,
    }
}

/// How the store files and expires records.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long a key is remembered at least, milliseconds.
    pub window_ms: i64,
    /// Width of one bucket, seconds.
    pub bucket_secs: i64,
    /// Column families of in-process handlers (e.g. `ledger`).
    pub handler_cfs: Vec<&'static str>,
    /// Sync the WAL on every commit. Only benchmarks turn this off.
    pub sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            window_ms: 24 * 3600 * 1000,
            bucket_secs: 3600,
            handler_cfs: Vec::new(),
            sync: true,
        }
    }
}

/// The dedup store of one worker.
pub struct DedupStore {
    /// `None` only while a reopen runs or after one failed.
    db: RwLock<Option<Db>>,
    path: PathBuf,
    opts: StoreOptions,
    clock: Arc<dyn Clock>,
    /// Live buckets by start; a `RwLock` because lookups are many and bucket
    /// creation and expiry are rare. Never held across a RocksDB call that
    /// creates or drops a column family.
    buckets: RwLock<BTreeSet<i64>>,
    /// Highest processing time handed out, Unix milliseconds.
    high_water_ms: AtomicI64,
    /// How many times the wall clock was seen behind the high-water mark.
    clock_clamps: AtomicU64,
    /// Changelog positions of partitions that have no checkpoint yet (a
    /// restore before anything was handled), by checkpoint key: taken by
    /// the partition's first checkpoint.
    changelog_pending: Mutex<HashMap<Vec<u8>, i64>>,
    /// Batches handed over to be written by a thread of their own.
    behind: behind::Behind,
}

/// Share of a bucket's memtable spent on its bloom filter. The filter is
/// allocated with every memtable, also the empty ones of old buckets, so it is
/// kept small: 0.02 of the 64 MiB default is 1.3 MiB per live bucket.
const MEMTABLE_BLOOM_RATIO: f64 = 0.02;

/// Options of a column family whose lookups mostly miss: a whole-key bloom
/// filter in its tables and in its memtable answers a miss without
/// searching either.
fn filtered_cf_options() -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_bloom_filter(10.0, false);
    block.set_whole_key_filtering(true);
    let mut o = Options::default();
    o.set_block_based_table_factory(&block);
    o.set_memtable_whole_key_filtering(true);
    o.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
    o
}

/// Options of a bucket family. Most lookups miss (new keys) and the
/// current bucket's records are mostly in its memtable: filtered.
fn bucket_cf_options() -> Options {
    let mut o = filtered_cf_options();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Keys are 16-byte hashes, inserted in random order: a hash table of
    // small skiplists (the whole key as its prefix) finds an insert's place
    // in a few comparisons instead of a search down one skiplist of the
    // whole memtable. Scans of a bucket need `total_order_seek`
    // (`bucket_scan_options`).
    o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(KEY_HASH_BYTES));
    o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
        bucket_count: MEMTABLE_HASH_BUCKETS,
        height: 4,
        branching_factor: 4,
    });
    o
}

/// Length of a dedup record's key (an xxh3-128 of scope and key).
const KEY_HASH_BYTES: usize = 16;

/// Hash buckets of a bucket family's memtable: 8 bytes each, allocated with
/// every memtable (256 KiB), so ~20 records per bucket in a full 64 MiB
/// memtable.
const MEMTABLE_HASH_BUCKETS: usize = 32_768;

/// Read options for a scan of a whole bucket family (its memtable is hashed
/// by key: without a total order, a scan would see one key's bucket only).
pub(crate) fn bucket_scan_options() -> rocksdb::ReadOptions {
    let mut r = rocksdb::ReadOptions::default();
    r.set_total_order_seek(true);
    r
}

impl DedupStore {
    /// Opens (creating if needed) the store at `path`, finding every existing
    /// bucket. Fails with [`StoreError::BucketWidthChanged`] rather than
    /// misfile records when the configured width differs from the stored one.
    pub fn open(
        path: &Path,
        opts: StoreOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        if !Self::exists_at(path) {
            Self::check_fresh_dir(path)?;
        }
        Self::open_inner(path, opts, clock, false)
    }

    /// A new store is only created in a missing or empty directory: never
    /// over a damaged store (files without `CURRENT`) or someone else's files.
    fn check_fresh_dir(path: &Path) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(path) else {
            return Ok(()); // missing: RocksDB creates it
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if names
            .iter()
            .any(|n| n.starts_with("MANIFEST-") || n.ends_with(".sst"))
        {
            return Err(StoreError::Damaged(path.to_path_buf()));
        }
        if !names.is_empty() {
            return Err(StoreError::NotEmpty(path.to_path_buf()));
        }
        Ok(())
    }

    /// True when `path` holds a RocksDB database (an idem store or not).
    pub fn exists_at(path: &Path) -> bool {
        path.join("CURRENT").is_file()
    }

    /// Opens an existing store read-only, beside a worker that may be running
    /// on it: for inspection commands and tests. The bucket width is taken
    /// from the store itself. Writes fail.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        Self::open_read_only_with_window(path, StoreOptions::default().window_ms)
    }

    /// Like [`DedupStore::open_read_only`], judging expiry by `window_ms`
    /// (the configured window) so that lookups see what the worker sees.
    pub fn open_read_only_with_window(path: &Path, window_ms: i64) -> Result<Self, StoreError> {
        if !Self::exists_at(path) {
            Self::check_fresh_dir(path)?;
            return Err(StoreError::NotAStore(path.to_path_buf()));
        }
        let opts = StoreOptions {
            bucket_secs: 1,
            window_ms,
            ..StoreOptions::default()
        };
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let mut store = Self::open_inner(path, opts, clock, true)?;
        let (width, hwm) = {
            let db = store.db()?;
            let meta = family(&db, META_CF)?;
            let width = db
                .get_cf(&meta, META_BUCKET)
                .map_err(rocks("read the bucket width"))?
                .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
                .ok_or(StoreError::Corrupt {
                    what: "metadata",
                    detail: "no bucket width recorded".into(),
                })?;
            let hwm = db
                .get_cf(&meta, META_HWM)
                .map_err(rocks("read the clock high-water mark"))?
                .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes));
            (width, hwm)
        };
        if let Some(hwm) = hwm {
            store.high_water_ms.store(hwm, Ordering::SeqCst);
        }
        store.opts.bucket_secs = width as i64;
        Ok(store)
    }

    fn open_inner(
        path: &Path,
        opts: StoreOptions,
        clock: Arc<dyn Clock>,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let (db, names) = open_db(path, &opts, read_only)?;
        let buckets = bucket_starts(&names, opts.bucket_secs);
        let store = Self {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            opts,
            clock,
            buckets: RwLock::new(buckets),
            high_water_ms: AtomicI64::new(i64::MIN),
            clock_clamps: AtomicU64::new(0),
            changelog_pending: Mutex::new(HashMap::new()),
            behind: behind::Behind::default(),
        };
        if !read_only {
            store.check_meta()?;
        }
        Ok(store)
    }

    fn check_meta(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let meta = family(&db, META_CF)?;
        let read_u64 = |k: &[u8]| -> Result<Option<u64>, StoreError> {
            let v = db.get_cf(&meta, k).map_err(rocks("read store metadata"))?;
            v.map(|v| {
                v.as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: "metadata",
                        detail: format!("{} is {} bytes", String::from_utf8_lossy(k), v.len()),
                    })
            })
            .transpose()
        };
        match read_u64(META_SCHEMA)? {
            Some(v) if v != SCHEMA_VERSION => {
                return Err(StoreError::SchemaVersion {
                    path: self.path.clone(),
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(_) => {}
            None => db
                .put_cf(&meta, META_SCHEMA, SCHEMA_VERSION.to_be_bytes())
                .map_err(rocks("write the schema version"))?,
        }
        match read_u64(META_BUCKET)? {
            Some(v) if v as i64 != self.opts.bucket_secs => {
                return Err(StoreError::BucketWidthChanged {
                    path: self.path.clone(),
                    stored: v as i64,
                    configured: self.opts.bucket_secs,
                })
            }
            Some(_) => {}
            None => db
                .put_cf(
                    &meta,
                    META_BUCKET,
                    (self.opts.bucket_secs as u64).to_be_bytes(),
                )
                .map_err(rocks("write the bucket width"))?,
        }
        db.put_cf(
            &meta,
            META_WINDOW,
            (self.opts.window_ms as u64).to_be_bytes(),
        )
        .map_err(rocks("write the window"))?;
        if let Some(hwm) = read_u64(META_HWM)? {
            self.high_water_ms.fetch_max(hwm as i64, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The open database, or [`StoreError::Closed`] between a failed reopen
    /// and the next one. Held for one operation; never across a call that
    /// takes it again (a reopen waiting for the lock would deadlock it).
    fn db(&self) -> Result<DbRef<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed(self.path.clone()));
        }
        Ok(DbRef(guard))
    }

    /// Closes the database now, while handles to the store remain: every
    /// operation then fails with [`StoreError::Closed`] until
    /// [`DedupStore::reopen`]. For handing the directory over, and for tests
    /// of what the worker does without its store.
    pub fn close(&self) {
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Closes the database and opens it again, with the options it was
    /// opened with. RocksDB keeps the error of a failed write (a full disk,
    /// a read-only or failing filesystem) and refuses every later write until
    /// the database is opened again; rust-rocksdb has no `Resume()`. Waits
    /// for operations in progress; while it runs, and after it failed, every
    /// operation fails with [`StoreError::Closed`] (a transient error), so a
    /// worker can keep trying.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Closing first: RocksDB's lock file allows one open per process.
        *slot = None;
        let (db, names) = open_db(&self.path, &self.opts, false)?;
        *self.buckets.write().unwrap_or_else(|e| e.into_inner()) =
            bucket_starts(&names, self.opts.bucket_secs);
        *slot = Some(db);
        drop(slot);
        self.check_meta()
    }

    /// The store's options.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The current processing time: the clock, clamped so that it never goes
    /// below any time handed out before (across restarts too).
    pub fn processing_time(&self) -> i64 {
        let now = self.clock.now_ms();
        let prev = self.high_water_ms.fetch_max(now, Ordering::SeqCst);
        if now < prev {
            self.clock_clamps.fetch_add(1, Ordering::Relaxed);
            prev
        } else {
            now
        }
    }

    /// How many times the clock was seen running backwards and was clamped.
    pub fn clock_clamps(&self) -> u64 {
        self.clock_clamps.load(Ordering::Relaxed)
    }

    /// The bucket that records first seen at `time_ms` go to.
    pub fn bucket_for(&self, time_ms: i64) -> Bucket {
        Bucket::containing(time_ms, self.opts.bucket_secs)
    }

    /// Live buckets, newest first.
    pub fn live_buckets(&self) -> Vec<Bucket> {
        let guard = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        guard
            .iter()
            .rev()
            .map(|&start_secs| Bucket {
                start_secs,
                width_secs: self.opts.bucket_secs,
            })
            .collect()
    }

    /// The record of `key` in any live bucket, newest bucket first. A bucket
    /// that has expired but is not dropped yet (expiry runs on a timer) is not
    /// consulted, so whether a key is remembered depends only on the window,
    /// never on when the expiry timer last ran.
    pub fn lookup(&self, key: &ScopedKeyHash) -> Result<Option<DedupRecord>, StoreError> {
        Ok(self.lookup_many(std::slice::from_ref(key))?.pop().flatten())
    }

    /// The records of many keys at once, in the order given, with the same
    /// rules as [`DedupStore::lookup`]: one batched read per live bucket,
    /// newest first, for the keys not found yet. This is how a batch of
    /// messages is looked up.
    pub fn lookup_many(
        &self,
        keys: &[ScopedKeyHash],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError> {
        let db = self.db()?;
        let now = self
            .clock
            .now_ms()
            .max(self.high_water_ms.load(Ordering::SeqCst));
        let mut found: Vec<Option<DedupRecord>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        if !self.behind.is_idle() {
            // Batches handed over and not written yet hold the newest records.
            let window = self.opts.window_ms;
            pending.retain(|&i| {
                let hit = self.behind.find(|b| {
                    b.records
                        .get(&keys[i])
                        .filter(|(bucket, _)| bucket.expires_at_ms(window) > now)
                        .map(|(_, r)| r.clone())
                });
                let missing = hit.is_none();
                found[i] = hit;
                missing
            });
        }
        for bucket in self.live_buckets() {
            if pending.is_empty() {
                break;
            }
            if bucket.expires_at_ms(self.opts.window_ms) <= now {
                continue;
            }
            // A bucket dropped since the list was taken has no handle: skip
            // it. A handle taken keeps the column family alive for this read.
            let Some(cf) = db.cf_handle(&bucket.name()) else {
                continue;
            };
            let results = db.batched_multi_get_cf(&cf, pending.iter().map(|&i| &keys[i].0), false);
            let mut still = Vec::with_capacity(pending.len());
            for (&i, r) in pending.iter().zip(results) {
                match r.map_err(rocks("look up keys"))? {
                    Some(bytes) => found[i] = Some(decode_record(&bytes)?),
                    None => still.push(i),
                }
            }
            pending = still;
        }
        Ok(found)
    }

    /// The next offset to process for a partition, if one was checkpointed.
    pub fn checkpoint(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .checkpoint_detail(topic, partition)?
            .map(|c| c.next_offset))
    }

    /// A partition's whole checkpoint: the next offset, the identity of the
    /// message before it and the earlier checkpoints kept as marks.
    pub fn checkpoint_detail(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<Checkpoint>, StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        let cf = family(&db, OFFSETS_CF)?;
        let v = db
            .get_cf(&cf, checkpoint_key(topic, partition))
            .map_err(rocks("read a partition checkpoint"))?;
        v.map(|bytes| {
            Checkpoint::decode(bytes.as_slice()).map_err(|e| StoreError::Corrupt {
                what: "checkpoint",
                detail: e.to_string(),
            })
        })
        .transpose()
    }

    /// Moves a partition's checkpoint back to an earlier mark, in a synced
    /// write: for a log that was rewritten above that mark, whose messages
    /// are then read again (those already recorded resolve as duplicates).
    /// The marks at or above it are dropped.
    pub fn rewind_checkpoint(
        &self,
        topic: &str,
        partition: i32,
        to: &CheckpointMark,
    ) -> Result<(), StoreError> {
        let key = checkpoint_key(topic, partition);
        let prev = self.checkpoint_detail(topic, partition)?;
        let changelog_next = prev.as_ref().map_or(0, |c| c.changelog_next);
        let history = prev
            .map(|c| c.history)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.next_offset < to.next_offset)
            .collect();
        let c = Checkpoint {
            next_offset: to.next_offset,
            written_at_ms: self.processing_time(),
            last_message: to.last_message.clone(),
            history,
            changelog_next,
        };
        self.put_checkpoint(&key, &c, self.opts.sync, "rewind a partition checkpoint")
    }

    /// Writes one partition checkpoint on its own (outside a batch).
    fn put_checkpoint(
        &self,
        key: &[u8],
        c: &Checkpoint,
        sync: bool,
        what: &'static str,
    ) -> Result<(), StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        let cf = family(&db, OFFSETS_CF)?;
        let mut wb = WriteBatch::default();
        wb.put_cf(&cf, key, c.encode_to_vec());
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(wb, &wo).map_err(rocks(what))
    }

    /// Records, in a synced write (which makes the restored records written
    /// before it durable too), that this store holds a partition's
    /// changelog up to `changelog_next` and so knows its keys up to
    /// `known_through`, where the partition starts: the checkpoint moves up
    /// to it (never down). Without a checkpoint and a start, nothing is
    /// recorded, and a later restore reads the changelog again.
    pub fn mark_restored(
        &self,
        topic: &str,
        partition: i32,
        changelog_next: i64,
        known_through: Option<i64>,
    ) -> Result<(), StoreError> {
        let prev = self.checkpoint_detail(topic, partition)?;
        let c = match (prev, known_through) {
            (Some(mut c), k) => {
                if let Some(k) = k.filter(|k| *k > c.next_offset) {
                    c.next_offset = k;
                    c.last_message.clear();
                }
                c.changelog_next = changelog_next;
                c
            }
            (None, Some(k)) => Checkpoint {
                next_offset: k,
                written_at_ms: self.processing_time(),
                changelog_next,
                ..Checkpoint::default()
            },
            (None, None) => {
                // Kept until the partition's first checkpoint.
                self.pending_positions()
                    .insert(checkpoint_key(topic, partition), changelog_next);
                return self.sync_wal();
            }
        };
        self.put_checkpoint(
            &checkpoint_key(topic, partition),
            &c,
            true,
            "record a partition's changelog position",
        )
    }

    /// Moves a partition's changelog position from `from` to `to` when it is
    /// at `from`: the records in between are this worker's own (its claim),
    /// so a later restore need not read them again. Otherwise nothing
    /// changes. Not synced: losing it only makes a later restore read more.
    pub fn advance_changelog_position(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<(), StoreError> {
        let Some(mut c) = self.checkpoint_detail(topic, partition)? else {
            if let Some(next) = self
                .pending_positions()
                .get_mut(&checkpoint_key(topic, partition))
                .filter(|n| **n == from)
            {
                *next = to;
            }
            return Ok(());
        };
        if c.changelog_next != from {
            return Ok(());
        }
        c.changelog_next = to;
        self.put_checkpoint(
            &checkpoint_key(topic, partition),
            &c,
            false,
            "record a partition's changelog position",
        )
    }

    fn pending_positions(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, i64>> {
        self.changelog_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every checkpoint in the store: (topic, partition, next offset).
    pub fn checkpoints(&self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        let cf = family(&db, OFFSETS_CF)?;
        let mut out = Vec::new();
        for item in db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks("read checkpoints"))?;
            let Some((topic, partition)) = parse_checkpoint_key(&k) else {
                return Err(StoreError::Corrupt {
                    what: "checkpoint key",
                    detail: format!("{} bytes", k.len()),
                });
            };
            let c = Checkpoint::decode(v.as_ref()).map_err(|e| StoreError::Corrupt {
                what: "checkpoint",
                detail: e.to_string(),
            })?;
            out.push((topic, partition, c.next_offset));
        }
        Ok(out)
    }

    /// Reads a committed value of a handler column family.
    pub fn get_handler_value(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let handle = family(&db, cf)?;
        // The action is formatted only on a failure: this runs per handler read.
        db.get_cf(&handle, key)
            .map_err(|e| rocks(format!("read from column family `{cf}`"))(e))
    }

    /// Every committed (key, value) of a handler column family, in key order.
    pub fn scan_handler_cf(&self, cf: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        let handle = family(&db, cf)?;
        db.iterator_cf(&handle, rocksdb::IteratorMode::Start)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(rocks(format!("scan column family `{cf}`")))
            })
            .collect()
    }

    fn ensure_bucket(&self, db: &Db, bucket: Bucket) -> Result<(), StoreError> {
        let exists = self
            .buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&bucket.start_secs);
        if exists {
            return Ok(());
        }
        let name = bucket.name();
        if db.cf_handle(&name).is_none() {
            db.create_cf(&name, &bucket_cf_options())
                .map_err(rocks(format!("create bucket {name}")))?;
            tracing::info!(bucket = %name, "created bucket");
        }
        self.buckets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bucket.start_secs);
        Ok(())
    }

    /// Writes the whole batch atomically with the WAL synced (unless the store
    /// was opened with `sync = false`), together with the clock's high-water
    /// mark.
    pub fn commit(&self, batch: StoreBatch) -> Result<(), StoreError> {
        self.commit_ref(&batch)
    }

    /// Like [`DedupStore::commit`], leaving the batch to the caller (to keep
    /// elsewhere when the write fails).
    pub fn commit_ref(&self, batch: &StoreBatch) -> Result<(), StoreError> {
        self.settle_behind()?;
        self.commit_with(batch, self.opts.sync)
    }

    /// Like [`DedupStore::commit_ref`] without syncing the WAL: the batch is
    /// visible to every read at once and survives a crash of the process,
    /// but not of the machine, until [`DedupStore::sync_wal`] returns. A
    /// crash before that keeps a prefix of the batches written (each one
    /// whole or not at all).
    pub fn commit_unsynced(&self, batch: &StoreBatch) -> Result<(), StoreError> {
        self.settle_behind()?;
        self.commit_with(batch, false)
    }

    /// Makes every batch written so far durable (one fsync of the WAL).
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        db.flush_wal(true)
            .map_err(rocks("sync the write-ahead log"))
    }

    fn commit_with(&self, batch: &StoreBatch, sync: bool) -> Result<(), StoreError> {
        self.commit_group(std::slice::from_ref(&batch), sync)
    }

    /// Writes several batches, in order, as one atomic RocksDB write: all of
    /// them or none. A later batch's checkpoint of a partition builds on the
    /// earlier one's.
    pub(crate) fn commit_group(
        &self,
        batches: &[impl std::ops::Deref<Target = StoreBatch>],
        sync: bool,
    ) -> Result<(), StoreError> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        let db = self.db()?;
        let now = self.processing_time();
        let mut wb = WriteBatch::default();
        let mut buf = Vec::with_capacity(128);
        let mut checkpoints: HashMap<Vec<u8>, Checkpoint> = HashMap::new();
        for batch in batches {
            self.stage_records(&db, batch, &mut wb, &mut buf)?;
            self.stage_checkpoints(&db, batch, now, &mut wb, &mut checkpoints)?;
            for (cf, writes) in batch.effects.sorted() {
                let handle = family(&db, cf)?;
                for (key, value) in writes {
                    match value {
                        Some(v) => wb.put_cf(&handle, key, v),
                        None => wb.delete_cf(&handle, key),
                    }
                }
            }
        }
        let meta = family(&db, META_CF)?;
        wb.put_cf(&meta, META_HWM, (now as u64).to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(wb, &wo)
            .map_err(rocks("write a batch of dedup records"))
    }

    /// Adds a batch's dedup records to `wb`, in key order per column family:
    /// RocksDB's memtable insert starts its search from the previous
    /// insert's position, so sorted keys cost less than random ones.
    fn stage_records(
        &self,
        db: &Db,
        batch: &StoreBatch,
        wb: &mut WriteBatch,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let mut records: Vec<_> = batch.records.iter().collect();
        records.sort_unstable_by_key(|(key, (bucket, _))| (bucket.start_secs, key.0));
        for group in records.chunk_by(|(_, (a, _)), (_, (b, _))| a == b) {
            let bucket = group[0].1 .0;
            self.ensure_bucket(db, bucket)?;
            let cf = family(db, &bucket.name())?;
            for (key, (_, record)) in group {
                buf.clear();
                record.encode(buf).map_err(|e| StoreError::Corrupt {
                    what: "dedup record",
                    detail: format!("cannot encode: {e}"),
                })?;
                wb.put_cf(&cf, key.0, &*buf);
            }
        }
        Ok(())
    }

    /// Adds a batch's checkpoints to `wb`, each advanced from the one staged
    /// earlier in the same write (`staged`) or else the stored one.
    fn stage_checkpoints(
        &self,
        db: &Db,
        batch: &StoreBatch,
        now: i64,
        wb: &mut WriteBatch,
        staged: &mut HashMap<Vec<u8>, Checkpoint>,
    ) -> Result<(), StoreError> {
        if batch.checkpoints.is_empty() {
            return Ok(());
        }
        let offsets = family(db, OFFSETS_CF)?;
        let keys: Vec<Vec<u8>> = batch
            .checkpoints
            .keys()
            .map(|(topic, partition)| checkpoint_key(topic, *partition))
            .collect();
        let unstaged: Vec<&Vec<u8>> = keys.iter().filter(|k| !staged.contains_key(*k)).collect();
        let mut stored: HashMap<&Vec<u8>, Option<Checkpoint>> = HashMap::new();
        for (key, prev) in unstaged
            .iter()
            .zip(db.batched_multi_get_cf(&offsets, &unstaged, false))
        {
            let prev = prev
                .map_err(rocks("read a partition checkpoint"))?
                .map(|v| Checkpoint::decode(v.as_ref()))
                .transpose()
                .map_err(|e| StoreError::Corrupt {
                    what: "checkpoint",
                    detail: e.to_string(),
                })?;
            stored.insert(key, prev);
        }
        for (key, at) in keys.iter().zip(batch.checkpoints.values()) {
            let prev = match staged.remove(key) {
                Some(c) => Some(c),
                None => stored.remove(key).flatten().or_else(|| {
                    self.pending_positions()
                        .remove(key)
                        .map(|changelog_next| Checkpoint {
                            changelog_next,
                            ..Checkpoint::default()
                        })
                }),
            };
            let next = advance_checkpoint(prev, at, now);
            wb.put_cf(&offsets, key, next.encode_to_vec());
            staged.insert(key.clone(), next);
        }
        Ok(())
    }

    /// Checks that the store takes a synced write now (the clock high-water
    /// mark, rewritten as it is): the worker calls it before handling
    /// anything again after a failed batch, so that a broken store costs no
    /// handler call.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.settle_behind()?;
        let db = self.db()?;
        let now = self.processing_time();
        let meta = family(&db, META_CF)?;
        let mut wb = WriteBatch::default();
        wb.put_cf(&meta, META_HWM, (now as u64).to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(self.opts.sync);
        db.write_opt(wb, &wo).map_err(rocks("write a probe record"))
    }

    /// Drops every bucket whose end is at least a window old at processing
    /// time `now_ms`. Returns the buckets dropped. Safe to run concurrently
    /// with lookups and with itself.
    pub fn expire(&self, now_ms: i64) -> Result<Vec<Bucket>, StoreError> {
        let db = self.db()?;
        let mut dropped = Vec::new();
        for bucket in self.expired_buckets(now_ms) {
            let removed = self
                .buckets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&bucket.start_secs);
            if !removed {
                continue; // another expiry run got it
            }
            db.drop_cf(&bucket.name())
                .map_err(rocks(format!("drop bucket {}", bucket.name())))?;
            tracing::info!(bucket = %bucket.name(), "dropped expired bucket");
            dropped.push(bucket);
        }
        Ok(dropped)
    }
}

/// Opens the database at `path` with every column family it has plus the
/// fixed and handler ones; returns it with the names of its families.
fn open_db(
    path: &Path,
    opts: &StoreOptions,
    read_only: bool,
) -> Result<(Db, BTreeSet<String>), StoreError> {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_keep_log_file_num(4);
    // The bucket families' hashed memtables take one writer at a time.
    db_opts.set_allow_concurrent_memtable_write(false);
    // A torn last record (a crash mid-write of a batch never acknowledged)
    // is dropped; corruption anywhere else refuses to open instead of
    // silently losing every batch after it.
    db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    let existing = if path.join("CURRENT").exists() {
        Db::list_cf(&db_opts, path).map_err(rocks("list the store's column families"))?
    } else {
        Vec::new()
    };
    let mut names: BTreeSet<String> = existing.into_iter().collect();
    names.insert(META_CF.into());
    names.insert(OFFSETS_CF.into());
    names.extend(opts.handler_cfs.iter().map(|s| s.to_string()));
    names.remove("default");
    let descriptors = names.iter().map(|n| {
        let o = if Bucket::parse(n, 1).is_some() {
            bucket_cf_options()
        } else if opts.handler_cfs.contains(&n.as_str()) {
            // A handler reads a key per event, most of them absent (the
            // ledger's marker of an event not applied yet).
            filtered_cf_options()
        } else {
            Options::default()
        };
        ColumnFamilyDescriptor::new(n, o)
    });
    let db = if read_only {
        let all: Vec<String> =
            Db::list_cf(&db_opts, path).map_err(rocks("list the store's column families"))?;
        Db::open_cf_for_read_only(&db_opts, path, all, false)
    } else {
        Db::open_cf_descriptors(&db_opts, path, descriptors)
    }
    .map_err(rocks(format!("open the store at {}", path.display())))?;
    Ok((db, names))
}

/// The starts of the buckets among column family names.
fn bucket_starts(names: &BTreeSet<String>, bucket_secs: i64) -> BTreeSet<i64> {
    names
        .iter()
        .filter_map(|n| Bucket::parse(n, bucket_secs))
        .map(|b| b.start_secs)
        .collect()
}

/// A column family of the open database.
fn family<'a>(db: &'a Db, name: &str) -> Result<Arc<rocksdb::BoundColumnFamily<'a>>, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError::UnknownColumnFamily(name.to_string()))
}

/// A read lock on the open database, for one operation.
struct DbRef<'a>(std::sync::RwLockReadGuard<'a, Option<Db>>);

impl std::ops::Deref for DbRef<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        // `DedupStore::db` hands one out only when the database is open, and
        // the read lock keeps it open.
        self.0
            .as_ref()
            .expect("a DbRef is made only for an open database")
    }
}

/// A stored dedup record.
fn decode_record(bytes: &[u8]) -> Result<DedupRecord, StoreError> {
    DedupRecord::decode(bytes).map_err(|e| StoreError::Corrupt {
        what: "dedup record",
        detail: e.to_string(),
    })
}

/// How much processing time at least lies between two marks of a
/// checkpoint's history.
pub const MARK_SPACING_MS: i64 = 1_000;
/// How many earlier checkpoints a checkpoint keeps as marks: with
/// [`MARK_SPACING_MS`], at least the last half-minute of a busy partition.
pub const MARK_HISTORY: usize = 32;

/// The checkpoint that follows `prev` when a batch stages `at`: the previous
/// checkpoint becomes the newest mark once it is [`MARK_SPACING_MS`] newer
/// than the mark before it; marks at or above the new offset (after a
/// rewind) are dropped.
fn advance_checkpoint(prev: Option<Checkpoint>, at: &CheckpointAt, now: i64) -> Checkpoint {
    let mut history = Vec::new();
    let mut last_message = at.last_message.map(|m| m.to_vec()).unwrap_or_default();
    // When this batch's changelog records follow, in the changelog, the
    // last ones this store holds, the store holds the changelog up to them.
    let held = prev.as_ref().map_or(0, |p| p.changelog_next);
    let changelog_next = match at.changelog {
        Some((first, count)) if first == held => first + count,
        _ => held,
    };
    if let Some(p) = prev {
        history = p.history;
        if p.next_offset == at.next_offset && last_message.is_empty() {
            last_message = p.last_message.clone();
        }
        let spaced = history
            .first()
            .is_none_or(|h| p.written_at_ms - h.written_at_ms >= MARK_SPACING_MS);
        if p.next_offset < at.next_offset && !p.last_message.is_empty() && spaced {
            history.insert(
                0,
                CheckpointMark {
                    next_offset: p.next_offset,
                    last_message: p.last_message,
                    written_at_ms: p.written_at_ms,
                },
            );
        }
        history.retain(|h| h.next_offset < at.next_offset);
        history.truncate(MARK_HISTORY);
    }
    Checkpoint {
        next_offset: at.next_offset,
        written_at_ms: now,
        last_message,
        history,
        changelog_next,
    }
}

/// Checkpoint key: topic bytes, a zero byte, the partition big-endian.
fn checkpoint_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn parse_checkpoint_key(k: &[u8]) -> Option<(String, i32)> {
    if k.len() < 5 {
        return None;
    }
    let (topic, rest) = k.split_at(k.len() - 5);
    if rest[0] != 0 {
        return None;
    }
    let partition = i32::from_be_bytes(rest[1..5].try_into().ok()?);
    Some((String::from_utf8(topic.to_vec()).ok()?, partition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::key::IdempotencyKey;

    const HOUR: i64 = 3_600_000;

    fn open(dir: &Path, clock: &ManualClock) -> DedupStore {
        DedupStore::open(dir, StoreOptions::default(), Arc::new(clock.clone())).unwrap()
    }

    fn record(now: i64) -> DedupRecord {
        DedupRecord {
            fingerprint: vec![1; 16],
            first_seen_ms: now,
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 9,
            outcome: 1,
            refreshed_ms: 0,
            response: None,
        }
    }

    #[test]
    fn committed_records_and_checkpoints_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(100 * HOUR);
        let key = ScopedKeyHash::new("s", &IdempotencyKey(b"k".to_vec()));
        {
            let store = open(dir.path(), &clock);
            let mut b = StoreBatch::new();
            let now = store.processing_time();
            b.record(key, store.bucket_for(now), record(now));
            b.checkpoint("t", 0, 10, None);
            store.commit(b).unwrap();
        }
        let store = open(dir.path(), &clock);
        assert_eq!(store.lookup(&key).unwrap().unwrap().source_offset, 9);
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(10));
        assert_eq!(store.checkpoint("t", 1).unwrap(), None);
        assert_eq!(store.live_buckets().len(), 1);
        assert_eq!(store.checkpoints().unwrap(), vec![("t".to_string(), 0, 10)]);
    }

    #[test]
    fn checkpoints_keep_marks_a_second_apart_newest_first_and_a_rewind_drops_the_newer() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(100 * HOUR);
        let store = open(dir.path(), &clock);
        // A batch of 10 messages every 300 ms for 60 s: 200 checkpoints.
        for i in 1..=200i64 {
            let mut b = StoreBatch::new();
            b.checkpoint("t", 0, i * 10, Some([i as u8; 16]));
            store.commit(b).unwrap();
            clock.advance(300);
        }
        let cp = store.checkpoint_detail("t", 0).unwrap().unwrap();
        assert_eq!(cp.next_offset, 2000);
        assert_eq!(cp.last_message, vec![200u8; 16]);
        assert_eq!(cp.history.len(), MARK_HISTORY);
        // Newest first, each mark's identity that of its own checkpoint, 1.2
        // s apart (the first checkpoint at least 1 s after the mark before
        // it: every fourth), the newest within about a second of the head.
        let offsets: Vec<i64> = cp.history.iter().map(|m| m.next_offset).collect();
        assert_eq!(offsets[..3], [1970, 1930, 1890]);
        for m in &cp.history {
            assert_eq!(m.last_message, vec![(m.next_offset / 10) as u8; 16]);
        }
        for w in cp.history.windows(2) {
            assert_eq!(w[0].written_at_ms - w[1].written_at_ms, 1_200);
        }
        // Back to the mark at 1930: the marks at or above it go.
        let to = cp.history[1].clone();
        store.rewind_checkpoint("t", 0, &to).unwrap();
        let back = store.checkpoint_detail("t", 0).unwrap().unwrap();
        assert_eq!(back.next_offset, 1930);
        assert_eq!(back.last_message, vec![193u8; 16]);
        assert_eq!(back.history.len(), MARK_HISTORY - 2);
        assert_eq!(back.history[0].next_offset, 1890);
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(1930));
        // A batch that finished nothing keeps the identity of the offset.
        let mut b = StoreBatch::new();
        b.checkpoint("t", 0, 1930, None);
        store.commit(b).unwrap();
        let same = store.checkpoint_detail("t", 0).unwrap().unwrap();
        assert_eq!(same.last_message, vec![193u8; 16]);
    }

    #[test]
    fn bucket_is_dropped_only_a_full_window_after_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(100 * HOUR);
        let store = open(dir.path(), &clock);
        let key = ScopedKeyHash::new("s", &IdempotencyKey(b"k".to_vec()));
        let mut b = StoreBatch::new();
        let now = store.processing_time();
        b.record(key, store.bucket_for(now), record(now));
        store.commit(b).unwrap();
        // Bucket [100h, 101h) expires at 101h + 24h = 125h.
        assert!(store.expire(125 * HOUR - 1).unwrap().is_empty());
        assert!(store.lookup(&key).unwrap().is_some());
        assert_eq!(store.expire(125 * HOUR).unwrap().len(), 1);
        assert!(store.lookup(&key).unwrap().is_none());
        assert!(store.live_buckets().is_empty());
    }

    #[test]
    fn clock_that_jumps_back_is_clamped_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(10 * HOUR);
        {
            let store = open(dir.path(), &clock);
            assert_eq!(store.processing_time(), 10 * HOUR);
            let mut b = StoreBatch::new();
            b.checkpoint("t", 0, 1, None);
            store.commit(b).unwrap();
        }
        clock.set(8 * HOUR);
        let store = open(dir.path(), &clock);
        assert_eq!(store.processing_time(), 10 * HOUR);
        assert_eq!(store.clock_clamps(), 1);
    }

    #[test]
    fn reopening_with_another_bucket_width_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        drop(open(dir.path(), &clock));
        let opts = StoreOptions {
            bucket_secs: 600,
            ..StoreOptions::default()
        };
        let err = DedupStore::open(dir.path(), opts, Arc::new(clock))
            .err()
            .unwrap();
        assert!(matches!(
            err,
            StoreError::BucketWidthChanged {
                stored: 3600,
                configured: 600,
                ..
            }
        ));
    }

    #[test]
    fn a_reopened_store_keeps_its_records_buckets_and_clock_and_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(100 * HOUR);
        let store = open(dir.path(), &clock);
        let key = ScopedKeyHash::new("s", &IdempotencyKey(b"k".to_vec()));
        let mut b = StoreBatch::new();
        let now = store.processing_time();
        b.record(key, store.bucket_for(now), record(now));
        b.checkpoint("t", 0, 10, None);
        store.commit(b).unwrap();
        clock.set(99 * HOUR);
        store.reopen().unwrap();
        assert_eq!(store.lookup(&key).unwrap().unwrap().source_offset, 9);
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(10));
        assert_eq!(store.live_buckets().len(), 1);
        assert_eq!(store.processing_time(), 100 * HOUR);
        let mut b = StoreBatch::new();
        b.checkpoint("t", 0, 11, None);
        store.commit(b).unwrap();
        store.probe().unwrap();
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(11));
    }

    #[test]
    fn checkpoint_keys_round_trip() {
        let k = checkpoint_key("pay.ments", -1);
        assert_eq!(parse_checkpoint_key(&k), Some(("pay.ments".into(), -1)));
    }
}
