//! The content-addressed stage cache.
//!
//! ```text
//! <cache>/objects/<key>/        a published output: the stage's files + MANIFEST
//! <cache>/work/<key>/           a stage being computed (resumable stages keep state here)
//! <cache>/locks/<key>.lock      held (flock) by the one process computing <key>
//! ```
//! A stage writes only into its work directory; when it succeeds the runner writes the
//! manifest (file sizes and hashes) and renames the directory into `objects/` — one atomic
//! rename, so a killed or failed stage never leaves an output that a later run takes as valid.
//! Another process wanting the same key blocks on the lock, then finds the published object.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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
    pub params: std::collections::BTreeMap<String, serde_json::Value>,
    /// Upstream stage name → key.
    pub upstream: std::collections::BTreeMap<String, String>,
    /// Hash of the external files the key covers (empty when none).
    pub data_hash: String,
    pub seconds: f64,
    /// Experiment that computed it (informational: objects are shared).
    pub computed_for: String,
    /// Relative path → (size, blake3).
    pub files: std::collections::BTreeMap<String, (u64, String)>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache> {
        for sub in ["objects", "work", "locks"] {
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

    /// The published manifest for `key`, if the object exists and verifies (manifest parses,
    /// every listed file exists with its recorded size).
    pub fn lookup(&self, key: &str) -> Option<Manifest> {
        let dir = self.object_dir(key);
        let text = fs::read_to_string(dir.join(MANIFEST)).ok()?;
        let m: Manifest = serde_json::from_str(&text).ok()?;
        if m.key != key {
            return None;
        }
        for (rel, (size, _)) in &m.files {
            match fs::metadata(dir.join(rel)) {
                Ok(md) if md.len() == *size => {}
                _ => return None,
            }
        }
        Some(m)
    }

    /// Full verification: every file's content hash matches the manifest.
    pub fn verify_deep(&self, key: &str) -> Result<()> {
        let m = self
            .lookup(key)
            .with_context(|| format!("object {key} missing or incomplete"))?;
        let dir = self.object_dir(key);
        for (rel, (_, hash)) in &m.files {
            let h = hash_file(&dir.join(rel))?;
            if &h != hash {
                bail!("object {key}: {rel} does not match its manifest");
            }
        }
        Ok(())
    }

    /// Take the exclusive lock for computing `key` (blocks while another process holds it).
    /// `on_wait` is called once if the lock is busy.
    pub fn lock(&self, key: &str, on_wait: impl FnOnce()) -> Result<KeyLock> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
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

    /// Publish the work directory of `key` as its object: write the manifest (listing every
    /// file with its size and hash), then rename atomically. A forced re-run replaces an
    /// existing object.
    pub fn publish(&self, key: &str, mut manifest: Manifest) -> Result<Manifest> {
        let work = self.work_dir(key);
        manifest.files = list_files(&work)?
            .into_iter()
            .filter(|rel| rel != MANIFEST)
            .map(|rel| {
                let p = work.join(&rel);
                let size = fs::metadata(&p)?.len();
                Ok((rel, (size, hash_file(&p)?)))
            })
            .collect::<Result<_>>()?;
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
        Ok(manifest)
    }
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

pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
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

    fn manifest(key: &str) -> Manifest {
        Manifest {
            stage: "s".into(),
            kind: "debug".into(),
            version: 1,
            key: key.into(),
            params: Default::default(),
            upstream: Default::default(),
            data_hash: String::new(),
            seconds: 0.0,
            computed_for: "e".into(),
            files: Default::default(),
        }
    }

    #[test]
    fn publish_then_lookup_and_detect_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        let key = "k1";
        assert!(c.lookup(key).is_none());
        fs::create_dir_all(c.work_dir(key).join("sub")).unwrap();
        fs::write(c.work_dir(key).join("sub/a.txt"), b"hello").unwrap();
        let m = c.publish(key, manifest(key)).unwrap();
        assert_eq!(m.files["sub/a.txt"].0, 5);
        assert!(!c.work_dir(key).exists());
        assert!(c.lookup(key).is_some());
        c.verify_deep(key).unwrap();
        fs::write(c.object_dir(key).join("sub/a.txt"), b"hell").unwrap();
        assert!(c.lookup(key).is_none(), "a truncated file must not verify");
    }

    #[test]
    fn work_dir_without_manifest_is_not_an_object() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path()).unwrap();
        fs::create_dir_all(c.object_dir("k2")).unwrap();
        fs::write(c.object_dir("k2").join("x"), b"1").unwrap();
        assert!(c.lookup("k2").is_none());
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
