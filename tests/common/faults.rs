//! Real faults for the failure tests: a size-limited tmpfs mounted by the
//! test (filled to the last byte, or remounted read-only), and readers of
//! what the worker reports meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A tmpfs of a given size, mounted for the test and unmounted after.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this machine does not let the test mount (no
    /// CAP_SYS_ADMIN); the test then says so and does nothing.
    pub fn mount(size_mb: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Keeps the filesystem of `dir` full to the last byte (space that idem
/// frees, e.g. an old WAL deleted on reopen, is taken again at once) until
/// the returned flag is cleared; then removes the filler file.
pub fn keep_full(dir: &Path) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let on = Arc::new(AtomicBool::new(true));
    let flag = on.clone();
    let fill = move |f: &mut std::fs::File| {
        use std::io::Write as _;
        for size in [1 << 20, 4096, 1] {
            let block = vec![0u8; size];
            while f.write_all(&block).is_ok() {}
        }
    };
    fill(&mut f);
    let handle = std::thread::spawn(move || {
        while flag.load(Ordering::SeqCst) {
            fill(&mut f);
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(f);
        std::fs::remove_file(&filler).unwrap();
    });
    (on, handle)
}

pub fn ready(addr: std::net::SocketAddr) -> (u16, String) {
    match reqwest::blocking::get(format!("http://{addr}/readyz")) {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

impl Tmpfs {
    /// Makes the filesystem read-only (`mount -o remount,ro`); fails while a
    /// file on it is open for writing.
    pub fn remount_read_only(&self, read_only: bool) {
        let opt = if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        };
        let status = Command::new("mount")
            .args(["-o", opt])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "mount -o {opt} failed");
    }
}

/// Waits up to `secs` seconds for `cond`, failing with `what` (and what
/// `state` says at the end) when it never holds.
pub fn wait_until(
    secs: u64,
    what: &str,
    mut cond: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < until, "{what}: {}", state());
        std::thread::sleep(Duration::from_millis(50));
    }
}
