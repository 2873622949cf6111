//! The content-addressed stage cache.
//!
//! ```text
//! <cache>/objects/<key>/          a published output: the stage's files + MANIFEST.json
//! <cache>/work/<key>/             a stage being computed (resumable stages keep state here)
//! <cache>/locks/<key>.lock        held (flock) by the one process computing <key>
//! <cache>/stamps/<key>.json       the files' (size, mtime, ctime, inode) when last hashed
//! <cache>/quarantine/<key>.<t>/   a damaged object moved aside (never deleted by driveline)
//! ```
//! A stage writes only into its work directory; when it succeeds the runner writes the
//! manifest (file sizes and blake3 hashes) and renames the directory into `objects/`: one
//! atomic rename, so a killed or failed stage never leaves an output that a later run takes as
//! valid. Another process wanting the same key blocks on the lock, then finds the published
//! object.
//!
//! **Verification.** [`Cache::check`] is what every lookup goes through (planning, `status`,
//! before a stage consumes an upstream object):
//! 1. the manifest parses and names this key, and every listed file exists with its size;
//! 2. every file's content hash equals the manifest's, once per object per process. A stamp
//!    (DVC's "state database" idea) skips re-hashing files whose size, mtime, ctime and inode
//!    are what they were when they were last hashed: any write through the file system changes
//!    the ctime, which no user call can set back. But timestamps advance in ticks (a jiffy,
//!    or an NFS server's granularity, before Linux 6.13's multigrain timestamps): a write in
//!    the tick the stamp was taken in leaves it unchanged. So, as git does for "racily clean"
//!    index entries, a stamp is trusted only for a file whose ctime and mtime are strictly
//!    older than the stamps file's own mtime (set by the same file system's clock, so no
//!    NFS client/server skew); any other file is hashed again: a cost, never a wrong answer,
//!    and only until a check rewrites the stamps file in a later tick.
//!    Each file is stamped before it is hashed, so a write after the hash changes its stamp.
//!    `DRIVELINE_VERIFY=full` ignores stamps, and `driveline cache verify` always hashes.
//!
//! A damaged object is moved to `quarantine/` (for inspection; nothing is deleted) and
//! reported with its key and the bad file; the stage then counts as stale and is recomputed.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "MANIFEST.json";

/// What a published object records about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub stage: String,
    pub kind: String,
    pub version: u32,
    pub key: String,
    /// Canonical values of the declared params, by dotted key.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Upstream stage name → key.
    pub upstream: BTreeMap<String, String>,
    /// Hash of the dataset files the key covers (empty when none).
    pub data_hash: String,
    /// Other external files the key covers by content: param key (`model.pretrained`) →
    /// blake3 of the file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
    pub seconds: f64,
    /// Experiment that computed it (informational: objects are shared).
    pub computed_for: String,
    /// Relative path → (size, blake3).
    pub files: BTreeMap<String, (u64, String)>,
}

/// What [`Cache::check`] found for a key.
#[derive(Debug)]
pub enum Check {
    /// Published and verified.
    Valid(Manifest),
    /// Not published (or a half-present directory without a manifest).
    Missing,
    /// Published but damaged: moved to quarantine (or left in place while another process
    /// holds the key's lock).
    Damaged(Damage),
}

#[derive(Debug, Clone)]
pub struct Damage {
    pub key: String,
    /// The stage that computed it, when the manifest could be read.
    pub stage: Option<String>,
    /// The file that is wrong, relative to the object (or the manifest itself).
    pub file: String,
    /// What is wrong with it.
    pub problem: String,
    /// Where the object was moved, if it was.
    pub quarantined: Option<PathBuf>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "object {}", short(&self.key))?;
        if let Some(s) = &self.stage {
            write!(f, " (stage {s})")?;
        }
        write!(f, " is damaged: {} {}", self.file, self.problem)?;
        match &self.quarantined {
            Some(q) => write!(f, "; moved to {}", q.display()),
            None => write!(f, "; left in place (its lock is held by another process)"),
        }
    }
}

/// The first 12 hex digits of a key, as printed everywhere.
pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// Whether to trust stamps (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Hash files whose stamp changed (or that have none); the default.
    Stamped,
    /// Hash every file.
    Full,
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

/// Objects verified by content in this process: (cache root, key).
static VERIFIED: Mutex<Option<HashSet<(PathBuf, String)>>> = Mutex::new(None);

fn verified(root: &Path, key: &str) -> bool {
    let g = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()
        .is_some_and(|s| s.contains(&(root.to_path_buf(), key.to_string())))
}

fn set_verified(root: &Path, key: &str, yes: bool) {
    let mut g = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    let s = g.get_or_insert_with(HashSet::new);
    let k = (root.to_path_buf(), key.to_string());
    if yes {
        s.insert(k);
    } else {
        s.remove(&k);
    }
}

/// A file's (size, mtime ns, ctime ns, inode).
type Stamp = (u64, i128, i128, u64);

/// Per file: its stamp when it was last hashed and matched.
type Stamps = BTreeMap<String, Stamp>;

fn stamp_of(md: &fs::Metadata) -> Stamp {
    (
        md.len(),
        nanos(md.mtime(), md.mtime_nsec()),
        nanos(md.ctime(), md.ctime_nsec()),
        md.ino(),
    )
}

fn nanos(secs: i64, nsec: i64) -> i128 {
    secs as i128 * 1_000_000_000 + nsec as i128
}

/// Whether a file's recorded stamp still vouches for its content: the stamp is unchanged,
/// and the file last changed strictly before the stamps file was written (`written`, its
/// mtime in ns). A file that changed in the tick the stamps were written in is "racily
/// clean": a write later in that tick would have left its stamp as recorded.
fn stamp_vouches(recorded: Option<&Stamp>, current: Option<&Stamp>, written: i128) -> bool {
    match (recorded, current) {
        (Some(r), Some(c)) => r == c && c.1 < written && c.2 < written,
        _ => false,
    }
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache> {
        for sub in ["objects", "work", "locks", "stamps"] {
            fs::create_dir_all(root.join(sub)).with_context(|| {
                format!("cannot create cache directory {}", root.join(sub).display())
            })?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    fn stamp_path(&self, key: &str) -> PathBuf {
        self.root.join("stamps").join(format!("{key}.json"))
    }

    /// The verified manifest of `key`, or None (missing, or damaged and quarantined).
    pub fn lookup(&self, key: &str) -> Option<Manifest> {
        match self.check(key) {
            Check::Valid(m) => Some(m),
            Check::Missing | Check::Damaged(_) => None,
        }
    }

    /// Look `key` up and verify it (see the module doc); a damaged object is quarantined.
    pub fn check(&self, key: &str) -> Check {
        let depth = match std::env::var("DRIVELINE_VERIFY").as_deref() {
            Ok("full") => Depth::Full,
            _ => Depth::Stamped,
        };
        self.check_with(key, depth, false)
    }

    /// [`Cache::check`] with an explicit depth; `again` re-hashes even an object already
    /// verified by this process (`cache verify`).
    pub fn check_with(&self, key: &str, depth: Depth, again: bool) -> Check {
        let dir = self.object_dir(key);
        if !dir.exists() {
            return Check::Missing;
        }
        match self.verify(key, depth, again) {
            Ok(m) => Check::Valid(m),
            Err(mut d) => {
                if !dir.join(MANIFEST).exists() && d.file == MANIFEST {
                    // A directory that was never published (no manifest): not an object.
                    return Check::Missing;
                }
                d.quarantined = self.quarantine(key);
                Check::Damaged(d)
            }
        }
    }

    /// Verify `key` in place: Ok(manifest) or the first problem found.
    fn verify(
        &self,
        key: &str,
        depth: Depth,
        again: bool,
    ) -> std::result::Result<Manifest, Damage> {
        let dir = self.object_dir(key);
        let damage = |stage: Option<&str>, file: &str, problem: String| Damage {
            key: key.to_string(),
            stage: stage.map(str::to_string),
            file: file.to_string(),
            problem,
            quarantined: None,
        };
        let text = fs::read_to_string(dir.join(MANIFEST))
            .map_err(|e| damage(None, MANIFEST, format!("cannot be read ({e})")))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| damage(None, MANIFEST, format!("is malformed ({e})")))?;
        let stage = Some(m.stage.as_str());
        if m.key != key {
            return Err(damage(stage, MANIFEST, format!("names key {}", m.key)));
        }
        let mut now = Stamps::new();
        for (rel, (size, _)) in &m.files {
            match fs::symlink_metadata(dir.join(rel)) {
                Ok(md) if md.is_file() && md.len() == *size => {
                    now.insert(rel.clone(), stamp_of(&md));
                }
                Ok(md) if md.is_file() => {
                    return Err(damage(
                        stage,
                        rel,
                        format!("has {} bytes, its manifest says {size}", md.len()),
                    ))
                }
                Ok(_) => return Err(damage(stage, rel, "is not a regular file".into())),
                Err(_) => return Err(damage(stage, rel, "is missing".into())),
            }
        }
        if !again && verified(&self.root, key) {
            return Ok(m);
        }
        let stamps = match depth {
            Depth::Full => None,
            Depth::Stamped => self.read_stamps(key),
        };
        for (rel, (_, hash)) in &m.files {
            if let Some((recorded, written)) = &stamps {
                if stamp_vouches(recorded.get(rel), now.get(rel), *written) {
                    continue;
                }
            }
            match hash_file(&dir.join(rel)) {
                Ok(h) if &h == hash => {}
                Ok(h) => {
                    return Err(damage(
                        stage,
                        rel,
                        format!(
                            "does not match its manifest (blake3 {} ≠ {})",
                            short(&h),
                            short(hash)
                        ),
                    ))
                }
                Err(e) => return Err(damage(stage, rel, format!("cannot be read ({e:#})"))),
            }
        }
        set_verified(&self.root, key, true);
        self.write_stamps(key, &now);
        Ok(m)
    }

    /// The stamps recorded for `key` and when they were written: the stamps file's mtime in
    /// ns, from the clock that dates the objects' files. None when there are none to read
    /// (best effort: that only costs a re-hash).
    fn read_stamps(&self, key: &str) -> Option<(Stamps, i128)> {
        // One open file for both: a concurrent rewrite (a rename) cannot pair the old
        // content with the new mtime.
        let mut f = File::open(self.stamp_path(key)).ok()?;
        let md = f.metadata().ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        let stamps = serde_json::from_str(&text).ok()?;
        Some((stamps, nanos(md.mtime(), md.mtime_nsec())))
    }

    /// Record the files' stamps, taken before they were hashed (best effort: a missing stamp
    /// only costs a re-hash).
    fn write_stamps(&self, key: &str, stamps: &Stamps) {
        let path = self.stamp_path(key);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        if let Ok(text) = serde_json::to_string(stamps) {
            if fs::write(&tmp, text).is_ok() && fs::rename(&tmp, &path).is_err() {
                fs::remove_file(&tmp).ok();
            }
        }
    }

    /// Move a damaged object aside, unless another process holds its lock (it is computing
    /// the key and will replace the object when it publishes). Returns where it went.
    fn quarantine(&self, key: &str) -> Option<PathBuf> {
        let lock = self.try_lock(key).ok()??;
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q).ok()?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dest = q.join(format!("{key}.{secs}-{}", std::process::id()));
        let moved = fs::rename(self.object_dir(key), &dest).ok().map(|_| dest);
        self.forget(key);
        drop(lock);
        moved
    }

    /// Take the exclusive lock for computing `key` (blocks while another process holds it).
    /// `on_wait` is called once if the lock is busy.
    pub fn lock(&self, key: &str, on_wait: impl FnOnce()) -> Result<KeyLock> {
        let path = self.lock_path(key);
        let file = open_lock(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock()
                    .with_context(|| format!("cannot lock {}", path.display()))?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        Ok(KeyLock { _file: file })
    }

    /// The lock of `key` if nobody holds it; None when another process does.
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>> {
        let path = self.lock_path(key);
        let file = open_lock(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(KeyLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    /// Publish the work directory of `key` as its object: write the manifest (listing every
    /// file with its size and hash), then rename atomically. A forced re-run replaces an
    /// existing object.
    pub fn publish(&self, key: &str, mut manifest: Manifest) -> Result<Manifest> {
        let work = self.work_dir(key);
        // Stamp each file before hashing it: a write after the hash then changes the stamp.
        let mut stamps = Stamps::new();
        manifest.files = BTreeMap::new();
        for rel in list_files(&work)?.into_iter().filter(|rel| rel != MANIFEST) {
            let p = work.join(&rel);
            let md =
                fs::symlink_metadata(&p).with_context(|| format!("cannot read {}", p.display()))?;
            stamps.insert(rel.clone(), stamp_of(&md));
            manifest.files.insert(rel, (md.len(), hash_file(&p)?));
        }
        let tmp = work.join(format!("{MANIFEST}.tmp"));
        {
            let mut f =
                File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, work.join(MANIFEST))?;
        let dest = self.object_dir(key);
        if dest.exists() {
            let trash = self
                .root
                .join("work")
                .join(format!("{key}.old-{}", std::process::id()));
            fs::rename(&dest, &trash)?;
            fs::remove_dir_all(&trash).ok();
        }
        fs::rename(&work, &dest)
            .with_context(|| format!("cannot publish {} to {}", work.display(), dest.display()))?;
        // Just hashed: the next process need not hash them again (renaming their directory
        // changes none of their stamps; where it did, that would only cost a re-hash).
        self.write_stamps(key, &stamps);
        set_verified(&self.root, key, true);
        Ok(manifest)
    }

    /// Drop what this cache remembers of `key` (its stamps, this process's verification):
    /// after its object was removed.
    pub fn forget(&self, key: &str) {
        fs::remove_file(self.stamp_path(key)).ok();
        set_verified(&self.root, key, false);
    }

    /// Every published key (directory names under `objects/`), sorted.
    pub fn keys(&self) -> Result<Vec<String>> {
        let dir = self.root.join("objects");
        let mut v = Vec::new();
        for e in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                v.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        v.sort();
        Ok(v)
    }
}

fn open_lock(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))
}

/// Held while computing a key; released on drop or when the process dies.
pub struct KeyLock {
    _file: File,
}

/// All regular files under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir).unwrap_or(&p);
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Bytes in the files under `dir` (0 when it cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    list_files(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| fs::symlink_metadata(dir.join(r)).ok())
        .map(|m| m.len())
        .sum()
}

/// blake3 of a file's content (large files are memory-mapped and hashed on every core).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// Hash of the files under a dataset root: names only (`content = false`) or names and
/// contents. Hidden files are ignored.
pub fn hash_tree(root: &Path, content: bool) -> Result<String> {
    if !root.is_dir() {
        bail!("data root not found: {}", root.display());
    }
    let files: Vec<String> = list_files(root)?
        .into_iter()
        .filter(|r| !r.split('/').any(|s| s.starts_with('.')))
        .collect();
    let hashes: Vec<String> = if content {
        use rayon::prelude::*;
        files
            .par_iter()
            .map(|r| hash_file(&root.join(r)))
            .collect::<Result<_>>()?
    } else {
        vec![String::new(); files.len()]
    };
    let mut h = blake3::Hasher::new();
    for (r, c) in files.iter().zip(&hashes) {
        h.update(r.as_bytes());
        h.update(b"\0");
        h.update(c.as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn manifest(key: &str) -> Manifest {
        Manifest {
            stage: "s".into(),
            kind: "debug".into(),
            version: 1,
            key: key.into(),
            params: Default::default(),
            upstream: Default::default(),
            data_hash: String::new(),
            inputs: Default::default(),
            seconds: 0.0,
            computed_for: "e".into(),
            files: Default::default(),
        }
    }

    fn published(c: &Cache, key: &str) {
        fs::create_dir_all(c.work_dir(key).join("sub")).unwrap();
        fs::write(c.work_dir(key).join("sub/a.txt"), b"hello").unwrap();
        fs::write(c.work_dir(key).join("b.bin"), vec![7u8; 3000]).unwrap();
        c.publish(key, manifest(key)).unwrap();
    }

    /// Flip one byte in place: same size, same inode (what bit rot or a stray write does).
    fn flip_byte(path: &Path, at: u64) {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
    }

    fn forget_this_process(c: &Cache, key: &str) {
        set_verified(&c.root, key, false);
    }

    /// Record `rel`'s current stamp, as if its (damaged) content had been hashed and matched.
    fn forge_stamp(c: &Cache, key: &str, rel: &str) {
        let mut stamps: Stamps =
            serde_json::from_str(&fs::read_to_string(c.stamp_path(key)).unwrap()).unwrap();
        let md = fs::metadata(c.object_dir(key).join(rel)).unwrap();
        stamps.insert(rel.into(), stamp_of(&md));
        c.write_stamps(key, &stamps);
    }

    /// When `path` last changed (its ctime).
    fn ctime_of(path: &Path) -> SystemTime {
        let md = fs::metadata(path).unwrap();
        UNIX_EPOCH + Duration::new(md.ctime() as u64, md.ctime_nsec() as u32)
    }

    /// Date the stamps file of `key` as if it had been written at `t`: the timestamp tick it
    /// lands in, which the kernel decides, is what the racy-clean rule compares with.
    fn set_stamps_written(c: &Cache, key: &str, t: SystemTime) {
        let f = File::options().write(true).open(c.stamp_path(key)).unwrap();
        f.set_modified(t).unwrap();
    }

    fn stamps_written(c: &Cache, key: &str) -> SystemTime {
        fs::metadata(c.stamp_path(key)).unwrap().modified().unwrap()
    }

    #[test]
    fn publish_then_lookup() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        let key = "k1";
        assert!(c.lookup(key).is_none());
        published(&c, key);
        assert!(!c.work_dir(key).exists());
        let m = c.lookup(key).expect("published object verifies");
        assert_eq!(m.files["sub/a.txt"].0, 5);
        assert_eq!(m.files["b.bin"].0, 3000);
    }

    #[test]
    fn truncated_file_is_damaged_and_quarantined() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        published(&c, "k1");
        fs::write(c.object_dir("k1").join("sub/a.txt"), b"hell").unwrap();
        let Check::Damaged(d) = c.check("k1") else {
            panic!("a truncated file must not verify")
        };
        assert_eq!(d.file, "sub/a.txt");
        assert!(d.problem.contains("4 bytes"), "{d}");
        let q = d.quarantined.expect("moved aside");
        assert!(q.join("sub/a.txt").is_file() && !c.object_dir("k1").exists());
        assert!(matches!(c.check("k1"), Check::Missing));
    }

    /// The byte flip keeps the size: only the content hash can see it, in a new process
    /// (stamps changed by the write) and in this one.
    #[test]
    fn same_size_corruption_is_found_by_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        published(&c, "k1");
        assert!(c.lookup("k1").is_some());
        flip_byte(&c.object_dir("k1").join("b.bin"), 1234);
        // As a new process would see it (this process verified it at publish).
        forget_this_process(&c, "k1");
        let Check::Damaged(d) = c.check("k1") else {
            panic!("a flipped byte must not verify")
        };
        assert_eq!(d.file, "b.bin");
        assert!(d.problem.contains("does not match its manifest"), "{d}");
        assert!(d.quarantined.is_some());
    }

    /// A stamp is trusted only while (size, mtime, ctime, inode) are unchanged: a corruption
    /// whose mtime is set back is still seen, because the write changed the ctime.
    #[test]
    fn stamps_skip_rehash_only_for_untouched_files() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        published(&c, "k1");
        let f = c.object_dir("k1").join("b.bin");
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        flip_byte(&f, 10);
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(fs::metadata(&f).unwrap().modified().unwrap(), mtime);
        forget_this_process(&c, "k1");
        assert!(matches!(c.check("k1"), Check::Damaged(_)));
    }

    /// Publishes "k1", flips a byte of its b.bin and forges a stamp that matches the damaged
    /// file, as if its content had been hashed and matched: only a check that hashes sees it.
    /// Returns the damaged file.
    fn damaged_behind_a_forged_stamp(c: &Cache) -> PathBuf {
        published(c, "k1");
        let f = c.object_dir("k1").join("b.bin");
        flip_byte(&f, 99);
        forge_stamp(c, "k1", "b.bin");
        f
    }

    /// A stamps file written a tick after the damage (not racily clean on any kernel): the
    /// stamped check trusts the stamp and skips the hash (the racy-clean rule keeps that
    /// optimisation), and only a full check sees the damage.
    #[test]
    fn full_depth_ignores_stamps() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        let f = damaged_behind_a_forged_stamp(&c);
        set_stamps_written(&c, "k1", ctime_of(&f) + Duration::from_secs(1));
        forget_this_process(&c, "k1");
        assert!(matches!(
            c.check_with("k1", Depth::Stamped, false),
            Check::Valid(_)
        ));
        assert!(matches!(
            c.check_with("k1", Depth::Full, true),
            Check::Damaged(_)
        ));
    }

    /// Before Linux 6.13 (and on NFS) a write in the tick the stamps were written in leaves
    /// the file's stamp as recorded. Forged here, whatever the kernel: the stamp matches the
    /// damaged file, but the file changed no earlier than the stamps file was written, so the
    /// stamp must not be trusted.
    #[test]
    fn racily_clean_stamp_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        let f = damaged_behind_a_forged_stamp(&c);
        // The same tick, at the boundary: "not older" includes equal.
        set_stamps_written(&c, "k1", ctime_of(&f));
        forget_this_process(&c, "k1");
        let Check::Damaged(d) = c.check_with("k1", Depth::Stamped, false) else {
            panic!("a racily clean stamp must not vouch for a flipped byte")
        };
        assert_eq!(d.file, "b.bin");
        assert!(d.problem.contains("does not match its manifest"), "{d}");
    }

    /// A racily clean file that is intact costs one re-hash: the check succeeds and rewrites
    /// the stamps file (a later mtime), and checking again neither fails nor loops, whether
    /// or not the new stamps file landed in the file's tick.
    #[test]
    fn racily_clean_intact_file_is_rehashed_and_restamped() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        published(&c, "k1");
        let recorded = fs::read_to_string(c.stamp_path("k1")).unwrap();
        let racy = UNIX_EPOCH + Duration::from_secs(1);
        set_stamps_written(&c, "k1", racy);
        for _ in 0..2 {
            forget_this_process(&c, "k1");
            assert!(matches!(
                c.check_with("k1", Depth::Stamped, false),
                Check::Valid(_)
            ));
            assert!(stamps_written(&c, "k1") > racy);
            assert_eq!(fs::read_to_string(c.stamp_path("k1")).unwrap(), recorded);
        }
    }

    #[test]
    fn damaged_object_is_left_in_place_while_its_lock_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        published(&c, "k1");
        fs::remove_file(c.object_dir("k1").join("b.bin")).unwrap();
        let _held = c.lock("k1", || {}).unwrap();
        // flock locks are per open file description: a second open in this process conflicts.
        let Check::Damaged(d) = c.check("k1") else {
            panic!("a missing file must not verify")
        };
        assert!(d.quarantined.is_none(), "{d}");
        assert!(c.object_dir("k1").exists());
    }

    #[test]
    fn work_dir_without_manifest_is_not_an_object() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        fs::create_dir_all(c.object_dir("k2")).unwrap();
        fs::write(c.object_dir("k2").join("x"), b"1").unwrap();
        assert!(matches!(c.check("k2"), Check::Missing));
    }

    #[test]
    fn tree_hash_sees_names_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), b"1").unwrap();
        let l1 = hash_tree(tmp.path(), false).unwrap();
        let c1 = hash_tree(tmp.path(), true).unwrap();
        fs::write(tmp.path().join("a"), b"2").unwrap();
        assert_eq!(hash_tree(tmp.path(), false).unwrap(), l1);
        assert_ne!(hash_tree(tmp.path(), true).unwrap(), c1);
        fs::write(tmp.path().join("b"), b"2").unwrap();
        assert_ne!(hash_tree(tmp.path(), false).unwrap(), l1);
    }
}
