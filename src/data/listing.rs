//! Listing a dataset's files by [`Layout`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Listing, SampleFiles};
use crate::config::schema::Layout;

/// Extensions accepted for images and masks in `split-dirs` (compared case-insensitively).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "tif", "tiff", "gif"];

/// Lists the dataset under `root` by `layout`.
///
/// - `drive`: `training/images/NN_training.tif` with `training/1st_manual/NN_manual1.gif`
///   (required) and `training/mask/NN_training_mask.gif` (required);
///   `test/images/NN_test.tif` with `test/mask/NN_test_mask.gif` (required) and
///   `test/1st_manual/NN_manual1.gif` when present. `valid` is `None` (the split stage holds
///   images out of `train`).
/// - `split-dirs`: `{train,valid,test}_images` with masks in `{train,valid,test}_masks`
///   matched by file stem (required for train and valid; `test_masks` is optional). No FOV.
/// - `synthetic`: an error — synthetic samples come from [`super::synthetic`], not files.
///
/// Errors name the missing root, folder or file.
pub fn list(layout: Layout, root: &Path) -> Result<Listing> {
    if !root.is_dir() {
        bail!(
            "dataset root {} does not exist or is not a folder",
            root.display()
        );
    }
    match layout {
        Layout::Drive => list_drive(root),
        Layout::SplitDirs => list_split_dirs(root),
        Layout::Synthetic => {
            bail!("the synthetic layout has no files to list; samples come from the generator")
        }
    }
}

/// Files in `dir` (not recursing), sorted by name; error naming `dir` if it cannot be read.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("folder {} does not exist", dir.display());
    }
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("reading folder {}", dir.display()))?
            .path();
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `path` if it is a file, else an error naming it and what it belongs to.
fn required(path: PathBuf, what: &str, image: &Path) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{what} {} for image {} is missing",
            path.display(),
            image.display()
        )
    }
}

fn list_drive(root: &Path) -> Result<Listing> {
    let split = |name: &str, label_required: bool| -> Result<Vec<SampleFiles>> {
        let dir = root.join(name);
        let manual = dir.join("1st_manual");
        let suffix = format!("_{name}.tif");
        let mut out = Vec::new();
        for image in files_in(&dir.join("images"))? {
            let fname = file_name(&image);
            let Some(id) = fname.strip_suffix(&suffix) else {
                continue; // e.g. a stray Thumbs.db
            };
            let id = id.to_string();
            let label_path = manual.join(format!("{id}_manual1.gif"));
            let label = if label_required {
                Some(required(label_path, "annotation", &image)?)
            } else {
                label_path.is_file().then_some(label_path)
            };
            let fov = required(
                dir.join("mask").join(format!("{id}_{name}_mask.gif")),
                "field-of-view mask",
                &image,
            )?;
            out.push(SampleFiles {
                id,
                image,
                label,
                fov: Some(fov),
            });
        }
        if out.is_empty() {
            bail!("no *{suffix} images in {}", dir.join("images").display());
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    };
    Ok(Listing {
        train: split("training", true)?,
        valid: None,
        test: split("test", false)?,
    })
}

/// Image files of `dir` keyed by stem; error on two files with the same stem.
fn by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for path in files_in(dir)? {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(prev) = out.insert(stem.clone(), path.clone()) {
            bail!(
                "{} and {} have the same stem {stem:?}",
                prev.display(),
                path.display()
            );
        }
    }
    Ok(out)
}

fn list_split_dirs(root: &Path) -> Result<Listing> {
    let split = |name: &str, masks_required: bool| -> Result<Vec<SampleFiles>> {
        let images_dir = root.join(format!("{name}_images"));
        let masks_dir = root.join(format!("{name}_masks"));
        let images = by_stem(&images_dir)?;
        if images.is_empty() {
            bail!("no images in {}", images_dir.display());
        }
        let masks = if masks_required || masks_dir.is_dir() {
            Some(by_stem(&masks_dir)?)
        } else {
            None
        };
        images
            .into_iter()
            .map(|(id, image)| {
                let label = match &masks {
                    None => None,
                    Some(m) => match m.get(&id) {
                        Some(p) => Some(p.clone()),
                        None => bail!(
                            "annotation for image {} is missing: no {}/{id}.(png|gif|jpg|tif)",
                            image.display(),
                            masks_dir.display()
                        ),
                    },
                };
                Ok(SampleFiles {
                    id,
                    image,
                    label,
                    fov: None,
                })
            })
            .collect()
    };
    Ok(Listing {
        train: split("train", true)?,
        valid: Some(split("valid", true)?),
        test: split("test", false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    /// A fake DRIVE tree with ids 21, 22 (training) and 01 (test).
    fn fake_drive(root: &Path) {
        for id in ["22", "21"] {
            touch(&root.join(format!("training/images/{id}_training.tif")));
            touch(&root.join(format!("training/1st_manual/{id}_manual1.gif")));
            touch(&root.join(format!("training/mask/{id}_training_mask.gif")));
        }
        touch(&root.join("test/images/01_test.tif"));
        touch(&root.join("test/mask/01_test_mask.gif"));
    }

    #[test]
    fn drive_listing_sorted_with_optional_test_labels() {
        let dir = tempfile::tempdir().unwrap();
        fake_drive(dir.path());
        let l = list(Layout::Drive, dir.path()).unwrap();
        let ids: Vec<_> = l.train.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["21", "22"]);
        assert_eq!(
            l.train[0].label.as_deref(),
            Some(
                dir.path()
                    .join("training/1st_manual/21_manual1.gif")
                    .as_path()
            )
        );
        assert!(l.valid.is_none());
        assert_eq!(l.test.len(), 1);
        assert_eq!(l.test[0].label, None);
        assert!(l.test[0].fov.is_some());
    }

    #[test]
    fn drive_missing_annotation_names_file() {
        let dir = tempfile::tempdir().unwrap();
        fake_drive(dir.path());
        std::fs::remove_file(dir.path().join("training/1st_manual/22_manual1.gif")).unwrap();
        let err = format!("{:#}", list(Layout::Drive, dir.path()).unwrap_err());
        assert!(err.contains("22_manual1.gif"), "{err}");
        assert!(err.contains("22_training.tif"), "{err}");
    }

    #[test]
    fn missing_root_or_folder_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = format!("{:#}", list(Layout::Drive, &missing).unwrap_err());
        assert!(err.contains("nope"), "{err}");
        fake_drive(dir.path());
        std::fs::remove_dir_all(dir.path().join("test")).unwrap();
        let err = format!("{:#}", list(Layout::Drive, dir.path()).unwrap_err());
        assert!(err.contains("test"), "{err}");
        assert!(list(Layout::Synthetic, dir.path()).is_err());
    }

    #[test]
    fn split_dirs_matches_masks_by_stem() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        touch(&r.join("train_images/b.jpg"));
        touch(&r.join("train_images/a.PNG"));
        touch(&r.join("train_images/notes.txt"));
        touch(&r.join("train_masks/a.gif"));
        touch(&r.join("train_masks/b.png"));
        touch(&r.join("valid_images/c.tif"));
        touch(&r.join("valid_masks/c.tiff"));
        touch(&r.join("test_images/d.jpeg"));
        let l = list(Layout::SplitDirs, r).unwrap();
        let ids: Vec<_> = l.train.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(
            l.train[1].label.as_deref(),
            Some(r.join("train_masks/b.png").as_path())
        );
        assert_eq!(l.train[0].fov, None);
        let valid = l.valid.unwrap();
        assert_eq!(
            valid[0].label.as_deref(),
            Some(r.join("valid_masks/c.tiff").as_path())
        );
        assert_eq!(l.test[0].label, None);

        std::fs::remove_file(r.join("train_masks/b.png")).unwrap();
        let err = format!("{:#}", list(Layout::SplitDirs, r).unwrap_err());
        assert!(err.contains("b.jpg"), "{err}");
    }

    /// The real DRIVE tree (the test fails when it is missing, unless DRIVELINE_SKIP_DRIVE=1).
    #[test]
    fn real_drive_listing() {
        let Some(root) = super::super::tests_support::drive_root() else {
            return;
        };
        let l = list(Layout::Drive, &root).unwrap();
        assert_eq!(l.train.len(), 20);
        assert_eq!(l.test.len(), 20);
        assert_eq!(l.train[0].id, "21");
        assert_eq!(l.train[19].id, "40");
        assert_eq!(l.test[0].id, "01");
        assert!(l.train.iter().all(|s| s.label.is_some() && s.fov.is_some()));
        assert!(l.test.iter().all(|s| s.fov.is_some()));
    }
}
