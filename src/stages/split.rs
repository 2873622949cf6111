//! `split`: a deterministic train/valid/test assignment of the dataset's images.
//!
//! DRIVE's 20 labelled training images are split 16/4 by a seeded shuffle (the seed's
//! `create_split.py`), or as pinned by `data.valid_ids`; a `split-dirs` dataset that ships
//! its own validation folder is kept as given. Output: `split.json`, paths relative to
//! `data.root` (so the output does not depend on where the dataset lives).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{DataInputs, Stage, StageCtx};
use crate::config::{DataConfig, Layout};
use crate::data::{self, SampleFiles};

pub struct Split;

/// One image of the split: its id and files relative to the data root (absent for synthetic).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub id: String,
    /// Synthetic generator index (synthetic layout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fov: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitFile {
    pub layout: Layout,
    pub train: Vec<Entry>,
    pub valid: Vec<Entry>,
    pub test: Vec<Entry>,
}

impl SplitFile {
    pub fn load(dir: &Path) -> Result<SplitFile> {
        let p = dir.join("split.json");
        let text =
            fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("malformed {}", p.display()))
    }

    /// The splits by name, in order.
    pub fn splits(&self) -> [(&'static str, &Vec<Entry>); 3] {
        [
            ("train", &self.train),
            ("valid", &self.valid),
            ("test", &self.test),
        ]
    }
}

impl Stage for Split {
    fn version(&self) -> u32 {
        1
    }
    fn params(&self) -> &'static [&'static str] {
        &[
            "data.layout",
            "data.valid_count",
            "data.valid_ids",
            "data.split_seed",
            "data.synthetic",
        ]
    }
    fn data(&self) -> DataInputs {
        DataInputs::Listing
    }
    fn role(&self) -> &'static str {
        "split"
    }

    fn run(&self, ctx: &StageCtx) -> Result<()> {
        let split = make_split(&ctx.exp.data)?;
        ctx.progress.log(&format!(
            "{} train, {} valid ({}), {} test",
            split.train.len(),
            split.valid.len(),
            split
                .valid
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            split.test.len()
        ));
        fs::write(
            ctx.out.join("split.json"),
            serde_json::to_string_pretty(&split)?,
        )?;
        Ok(())
    }
}

/// Compute the split for a data config (pure: no output written).
pub fn make_split(d: &DataConfig) -> Result<SplitFile> {
    let (labelled, given_valid, test) = match d.layout {
        Layout::Synthetic => {
            let s = &d.synthetic;
            let synth = |i: usize| Entry {
                id: format!("s{i:03}"),
                index: Some(i),
                image: None,
                label: None,
                fov: None,
            };
            let labelled: Vec<Entry> = (0..s.count).map(synth).collect();
            let test: Vec<Entry> = (s.count..s.count + s.test_count).map(synth).collect();
            (labelled, None, test)
        }
        layout => {
            let root = Path::new(&d.root);
            let listing = data::list(layout, root)
                .with_context(|| format!("listing data.root = {}", root.display()))?;
            let rel = |f: &SampleFiles| -> Entry {
                let r = |p: &Path| {
                    p.strip_prefix(root)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned()
                };
                Entry {
                    id: f.id.clone(),
                    index: None,
                    image: Some(r(&f.image)),
                    label: f.label.as_deref().map(r),
                    fov: f.fov.as_deref().map(r),
                }
            };
            let labelled: Vec<Entry> = listing.train.iter().map(rel).collect();
            let valid = listing.valid.map(|v| v.iter().map(rel).collect::<Vec<_>>());
            let test: Vec<Entry> = listing.test.iter().map(rel).collect();
            (labelled, valid, test)
        }
    };
    if let Some(valid) = given_valid {
        return Ok(SplitFile {
            layout: d.layout,
            train: labelled,
            valid,
            test,
        });
    }
    let (train, valid) = if !d.valid_ids.is_empty() {
        for id in &d.valid_ids {
            if !labelled.iter().any(|e| &e.id == id) {
                let have: Vec<&str> = labelled.iter().map(|e| e.id.as_str()).collect();
                bail!(
                    "data.valid_ids: no labelled image has id {id:?} (ids: {})",
                    have.join(", ")
                );
            }
        }
        labelled
            .into_iter()
            .partition::<Vec<_>, _>(|e| !d.valid_ids.contains(&e.id))
    } else {
        if d.valid_count >= labelled.len() {
            bail!(
                "data.valid_count = {} leaves no training image ({} labelled images)",
                d.valid_count,
                labelled.len()
            );
        }
        let mut order: Vec<usize> = (0..labelled.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(d.split_seed));
        let valid_idx: std::collections::BTreeSet<usize> =
            order[..d.valid_count].iter().copied().collect();
        let mut train = Vec::new();
        let mut valid = Vec::new();
        for (i, e) in labelled.into_iter().enumerate() {
            if valid_idx.contains(&i) {
                valid.push(e);
            } else {
                train.push(e);
            }
        }
        (train, valid)
    };
    Ok(SplitFile {
        layout: d.layout,
        train,
        valid,
        test,
    })
}
