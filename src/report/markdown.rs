//! `README.md` pages (GitHub-flavoured Markdown), images referenced by relative path.

use std::fmt::Write;
use std::path::Path;

use super::format::{FOV_NOTE, MISSING};
use super::tables::{self, Table};
use super::{
    ExperimentSummary, ReportDoc, ACCURACY_PNG, BEST_MIOU_PNG, LOSS_PNG, MIOU_OVERLAY_PNG,
    MIOU_PNG, SWEEP_PNG,
};

/// Escapes text for a Markdown table cell or paragraph (pipes, emphasis, brackets, HTML).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        // GFM never emphasises on an underscore inside a word: keep `a_b` readable.
        let inside_word = |j: Option<usize>| {
            j.and_then(|j| chars.get(j))
                .is_some_and(|c| c.is_alphanumeric())
        };
        match c {
            '_' if inside_word(i.checked_sub(1)) && inside_word(Some(i + 1)) => out.push(c),
            '|' | '*' | '_' | '[' | ']' | '`' | '\\' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

/// A relative path as a Markdown link target (forward slashes, spaces encoded).
fn link(p: &Path) -> String {
    let parts: Vec<String> = p
        .components()
        .map(|c| c.as_os_str().to_string_lossy().replace(' ', "%20"))
        .collect();
    parts.join("/")
}

fn table(out: &mut String, t: &Table) {
    let _ = writeln!(
        out,
        "| {} |",
        t.headers
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let align: Vec<&str> = t
        .numeric
        .iter()
        .map(|n| if *n { "---:" } else { ":---" })
        .collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for row in &t.rows {
        let cells: Vec<String> = row
            .iter()
            .map(|c| {
                if c.strong {
                    format!("**{}**", esc(&c.text))
                } else {
                    esc(&c.text)
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push('\n');
}

/// Details, final metrics and curve images of one experiment; `dir` is the folder of
/// its curve PNGs relative to the Markdown file, `level` the heading level to use.
fn experiment_body(out: &mut String, e: &ExperimentSummary, dir: &Path, level: usize) {
    if !e.description.trim().is_empty() {
        let _ = writeln!(out, "{}\n", esc(e.description.trim()));
    }
    table(out, &tables::details_table(e));
    let h = "#".repeat(level);
    let _ = writeln!(out, "{h} Final evaluation (best checkpoint)\n");
    match tables::eval_table(e) {
        Some(t) => {
            table(out, &t);
            let _ = writeln!(out, "{FOV_NOTE}\n");
        }
        None => {
            let _ = writeln!(out, "{MISSING} not evaluated yet.\n");
        }
    }
    let _ = writeln!(out, "{h} Training curves\n");
    for (file, alt) in [
        (LOSS_PNG, "Train vs valid loss"),
        (ACCURACY_PNG, "Pixel accuracy"),
        (MIOU_PNG, "mIoU"),
    ] {
        let _ = writeln!(
            out,
            "![{alt} of {}]({})\n",
            esc(&e.name),
            link(&dir.join(file))
        );
    }
}

/// The `README.md` of one experiment's report folder.
pub(crate) fn experiment_readme(e: &ExperimentSummary) -> String {
    let mut out = format!("# {}\n\n", esc(&e.name));
    experiment_body(&mut out, e, Path::new(""), 2);
    out
}

/// The comparison `README.md`: summary table, comparison charts, prediction grid and
/// one section per experiment.
pub(crate) fn comparison_readme(doc: &ReportDoc) -> String {
    let mut out = format!("# {}\n\n", esc(doc.title));
    let n = doc.exps.len();
    let _ = writeln!(
        out,
        "{n} experiment{}. Machine-readable numbers: [summary.csv](summary.csv); \
         self-contained page: [index.html](index.html).\n",
        if n == 1 { "" } else { "s" }
    );
    let _ = writeln!(out, "## Results\n");
    table(
        &mut out,
        &tables::results_table_with_params(doc.exps, &doc.param_columns),
    );
    if let Some(key) = &doc.sweep_key {
        let _ = writeln!(
            out,
            "![Validation F1 and mIoU against {}]({SWEEP_PNG})\n",
            esc(key)
        );
    }
    let _ = writeln!(
        out,
        "![Best validation mIoU per experiment]({BEST_MIOU_PNG})\n"
    );
    let _ = writeln!(
        out,
        "![Validation mIoU during training]({MIOU_OVERLAY_PNG})\n"
    );
    let _ = writeln!(out, "## Training cost\n");
    table(&mut out, &tables::cost_table(doc.exps));

    let _ = writeln!(out, "## Test predictions\n");
    if doc.grid_ids.is_empty() {
        let _ = writeln!(out, "{MISSING} no predictions recorded.\n");
    } else {
        let _ = writeln!(
            out,
            "Predicted vessels over each test image, one column per experiment.\n"
        );
        let mut head = vec!["Image".to_string()];
        head.extend(doc.exps.iter().map(|e| esc(&e.name)));
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|{}", " :---: |".repeat(head.len()));
        for id in &doc.grid_ids {
            let mut row = vec![esc(id)];
            for (e, files) in doc.exps.iter().zip(doc.files) {
                row.push(match files.predictions.get(id) {
                    Some(p) => format!(
                        "![{} on {}]({})<br>[mask]({}) · [probability]({})",
                        esc(&e.name),
                        esc(id),
                        link(&p.overlay),
                        link(&p.mask),
                        link(&p.prob)
                    ),
                    None => MISSING.to_string(),
                });
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push('\n');
    }

    let _ = writeln!(out, "## Experiments\n");
    for (e, files) in doc.exps.iter().zip(doc.files) {
        let _ = writeln!(out, "### {}\n", esc(&e.name));
        let dir = files.curves[0].parent().unwrap_or(Path::new(""));
        experiment_body(&mut out, e, dir, 4);
    }
    out
}
