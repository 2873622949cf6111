//! The self-contained `index.html`: every image is inlined as a base64 data URI and the
//! styles are inline, so the single file opens from disk anywhere, offline.

use std::fmt::Write;
use std::fs;
use std::path::Path;

use anyhow::Context;
use base64::Engine;

use super::format::{FOV_NOTE, MISSING};
use super::plots::palette;
use super::tables::{self, Table};
use super::{ExperimentSummary, ReportDoc, BEST_MIOU_PNG, MIOU_OVERLAY_PNG, SWEEP_PNG};

/// Escapes text for HTML element content and double-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Reads an image file and returns it as a `data:` URI (MIME type from its content).
fn data_uri(path: &Path) -> anyhow::Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    let mime = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::WebP) => "image/webp",
        _ => anyhow::bail!(
            "{} is not a PNG, JPEG, GIF or WebP image; browsers could not show it",
            path.display()
        ),
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(format!("data:{mime};base64,{b64}"))
}

/// An `<img>` of the file at `root/rel`, inlined.
fn img(root: &Path, rel: &Path, alt: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"<img src="{}" alt="{}">"#,
        data_uri(&root.join(rel))?,
        esc(alt)
    ))
}

fn table(out: &mut String, t: &Table, class: &str) {
    let _ = write!(
        out,
        r#"<div class="table-wrap"><table class="{class}"><thead><tr>"#
    );
    for (h, num) in t.headers.iter().zip(&t.numeric) {
        let _ = write!(out, "<th{}>{}</th>", num_class(*num), esc(h));
    }
    out.push_str("</tr></thead><tbody>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for (c, num) in row.iter().zip(&t.numeric) {
            let text = esc(&c.text);
            let text = if c.strong {
                format!("<strong>{text}</strong>")
            } else {
                text
            };
            let _ = write!(out, "<td{}>{text}</td>", num_class(*num));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

fn num_class(numeric: bool) -> &'static str {
    if numeric {
        r#" class="num""#
    } else {
        ""
    }
}

/// Page styles: a clean, print-friendly single column with responsive figure grids.
const CSS: &str = r#"
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --soft:#f6f8fa; --accent:#0969da; }
* { box-sizing:border-box; }
body { margin:0; color:var(--fg); background:#fff;
  font:15px/1.5 -apple-system,"Segoe UI","Helvetica Neue","DejaVu Sans",Arial,sans-serif; }
header { background:linear-gradient(135deg,#0b3d6e,#1565c0); color:#fff; padding:28px 0 22px; }
header h1 { margin:0 0 6px; font-size:28px; font-weight:650; letter-spacing:-.01em; }
header p { margin:0; opacity:.85; }
.wrap { max-width:1240px; margin:0 auto; padding:0 28px; }
nav { border-bottom:1px solid var(--line); background:var(--soft); position:sticky; top:0; z-index:1; }
nav .wrap { display:flex; flex-wrap:wrap; gap:4px 18px; padding-top:9px; padding-bottom:9px; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; }
nav a:hover { text-decoration:underline; }
main { padding:10px 0 40px; }
h2 { font-size:21px; margin:34px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:17px; margin:22px 0 8px; }
section.exp { border:1px solid var(--line); border-radius:10px; padding:4px 22px 18px; margin:22px 0; }
section.exp h2 { border:none; margin-top:18px; display:flex; align-items:center; gap:10px; }
.swatch { width:14px; height:14px; border-radius:3px; display:inline-block; flex:none; }
.muted { color:var(--muted); }
.table-wrap { overflow-x:auto; margin:8px 0 16px; }
table { border-collapse:collapse; font-size:14px; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; white-space:nowrap; }
thead th { white-space:normal; vertical-align:bottom; line-height:1.25; }
table.summary thead th.num { min-width:64px; }
thead th { background:var(--soft); font-weight:600; border-bottom:2px solid var(--line); }
tbody tr:nth-child(even) td { background:#fbfcfd; }
tbody tr:hover td { background:#eef4fb; }
.num { text-align:right; }
table.kv td:first-child { color:var(--muted); }
.figs { display:grid; gap:16px; grid-template-columns:repeat(auto-fit,minmax(340px,1fr)); margin:10px 0; align-items:start; }
.figs.two { grid-template-columns:repeat(auto-fit,minmax(420px,1fr)); }
.note { font-size:12.5px; color:var(--muted); margin:-8px 0 10px; }
figure { margin:0; border:1px solid var(--line); border-radius:8px; padding:8px; background:#fff; }
figure img { width:100%; height:auto; display:block; }
.cols { display:grid; gap:18px 26px; grid-template-columns:minmax(280px,380px) 1fr; align-items:start; }
@media (max-width:900px) { .cols { grid-template-columns:1fr; } }
table.grid { table-layout:fixed; width:100%; }
table.grid th, table.grid td { white-space:normal; text-align:center; vertical-align:top; padding:6px; }
table.grid td.id, table.grid td.muted { font-weight:600; width:70px; vertical-align:middle; }
table.grid img { width:100%; max-width:420px; height:auto; display:block; margin:0 auto; border-radius:4px; }
table.grid tbody tr:nth-child(even) td, table.grid tbody tr:hover td { background:none; }
table.sortable thead th { cursor:pointer; user-select:none; }
table.sortable thead th:hover { color:var(--accent); }
table.sortable thead th[aria-sort=ascending]::after { content:" \25B2"; font-size:10px; }
table.sortable thead th[aria-sort=descending]::after { content:" \25BC"; font-size:10px; }
footer { color:var(--muted); font-size:13px; border-top:1px solid var(--line); padding:14px 0 30px; }
"#;

/// Marks `<body data-images="ok:N">` once the page has loaded when every image decoded,
/// or `broken:<alts>` otherwise, so an automated headless-browser check can read it.
const IMAGE_CHECK_JS: &str = r#"
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || '(no alt)'; });
  document.body.dataset.images = broken.length ? 'broken:' + broken.join('|') : 'ok:' + imgs.length;
});
"#;

/// Sorts `table.sortable` by the clicked header (or Enter/Space on it): numbers numerically
/// (a numeric column's first click puts the largest first), text in natural order, missing
/// values ("—") last either way; a second click reverses. Plain script, no network.
const SORT_JS: &str = r#"
document.addEventListener('DOMContentLoaded', function () {
  function key(cell) {
    var t = cell.textContent.trim();
    if (t === '' || t === '\u2014') return null;
    var n = Number(t);
    return /^[-+]?[0-9.]+(e[-+]?[0-9]+)?$/i.test(t) && isFinite(n) ? n : t;
  }
  function compare(a, b) {
    if (typeof a === 'number' && typeof b === 'number') return a - b;
    return String(a).localeCompare(String(b), undefined, { numeric: true });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      th.title = 'Sort by ' + th.textContent;
      function sort() {
        var desc = th.getAttribute('aria-sort') === 'descending' ? false
                 : th.getAttribute('aria-sort') === 'ascending' ? true
                 : th.classList.contains('num');
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r, s) {
          var a = key(r.cells[col]), b = key(s.cells[col]);
          if (a === null || b === null) return (a === null) - (b === null);
          return desc ? compare(b, a) : compare(a, b);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener('click', sort);
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sort(); }
      });
    });
  });
});
"#;

fn anchor(i: usize) -> String {
    format!("exp-{}", i + 1)
}

fn swatch(i: usize) -> String {
    let c = palette(i);
    format!(
        r#"<span class="swatch" style="background:rgb({},{},{})"></span>"#,
        c.0, c.1, c.2
    )
}

/// The comparison page; images are read from `root` (the report folder) and inlined.
pub(crate) fn comparison_page(doc: &ReportDoc, root: &Path) -> anyhow::Result<String> {
    let mut o = String::new();
    let n = doc.exps.len();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n<script>{IMAGE_CHECK_JS}</script>\n\
         <script>{SORT_JS}</script>\n</head>\n<body>\n",
        esc(doc.title)
    );
    let _ = writeln!(
        o,
        "<header><div class=\"wrap\"><h1>{}</h1><p>{n} experiment{} · retinal-vessel segmentation · \
         best checkpoint chosen by validation mIoU</p></div></header>",
        esc(doc.title),
        if n == 1 { "" } else { "s" }
    );
    o.push_str("<nav><div class=\"wrap\"><a href=\"#summary\">Results</a><a href=\"#predictions\">Test predictions</a>");
    for (i, e) in doc.exps.iter().enumerate() {
        let _ = write!(o, "<a href=\"#{}\">{}</a>", anchor(i), esc(&e.name));
    }
    o.push_str("</div></nav>\n<main><div class=\"wrap\">\n");

    o.push_str("<h2 id=\"summary\">Results</h2>\n");
    table(
        &mut o,
        &tables::results_table_with_params(doc.exps, &doc.param_columns),
        "summary sortable",
    );
    o.push_str("<p class=\"note\">Click a column heading to sort.</p>\n");
    o.push_str("<div class=\"figs\">\n");
    let sweep_alt = doc
        .sweep_key
        .as_ref()
        .map(|k| format!("Validation F1 and mIoU against {k}"));
    let mut figures = vec![
        (BEST_MIOU_PNG, "Best validation mIoU of each experiment"),
        (MIOU_OVERLAY_PNG, "Validation mIoU during training"),
    ];
    if let Some(alt) = &sweep_alt {
        figures.push((SWEEP_PNG, alt.as_str()));
    }
    for (file, alt) in figures {
        let _ = writeln!(o, "<figure>{}</figure>", img(root, Path::new(file), alt)?);
    }
    o.push_str("</div>\n<h3>Training cost</h3>\n");
    table(&mut o, &tables::cost_table(doc.exps), "cost");

    o.push_str("<h2 id=\"predictions\">Test predictions</h2>\n");
    prediction_grid(&mut o, doc, root)?;

    for (i, (e, files)) in doc.exps.iter().zip(doc.files).enumerate() {
        experiment_section(&mut o, i, e, &files.curves, root)?;
    }
    o.push_str(
        "</div></main>\n<footer><div class=\"wrap\">Generated by driveline. \
         The numbers are also in <code>summary.csv</code>; each experiment's own report \
         is under <code>experiments/</code>.</div></footer>\n</body>\n</html>\n",
    );
    Ok(o)
}

/// Rows = test images, columns = experiments, cells = prediction overlays.
fn prediction_grid(o: &mut String, doc: &ReportDoc, root: &Path) -> anyhow::Result<()> {
    if doc.grid_ids.is_empty() {
        let _ = writeln!(
            o,
            "<p class=\"muted\">{MISSING} no predictions recorded.</p>"
        );
        return Ok(());
    }
    o.push_str(
        "<p class=\"muted\">Predicted vessels drawn over each test image, \
         one column per experiment.</p>\n<div class=\"table-wrap\"><table class=\"grid\"><thead><tr><th style=\"width:70px\">Image</th>",
    );
    for (i, e) in doc.exps.iter().enumerate() {
        let _ = write!(o, "<th>{} {}</th>", swatch(i), esc(&e.name));
    }
    o.push_str("</tr></thead><tbody>\n");
    for id in &doc.grid_ids {
        let _ = write!(o, "<tr><td class=\"id\">{}</td>", esc(id));
        for (e, files) in doc.exps.iter().zip(doc.files) {
            match files.predictions.get(id) {
                Some(p) => {
                    let alt = format!("{} on image {}", e.name, id);
                    let _ = write!(o, "<td>{}</td>", img(root, &p.overlay, &alt)?);
                }
                None => {
                    let _ = write!(o, "<td class=\"muted\">{MISSING}</td>");
                }
            }
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody></table></div>\n");
    Ok(())
}

fn experiment_section(
    o: &mut String,
    i: usize,
    e: &ExperimentSummary,
    curves: &[std::path::PathBuf; 3],
    root: &Path,
) -> anyhow::Result<()> {
    let _ = writeln!(
        o,
        "<section class=\"exp\" id=\"{}\"><h2>{}{}</h2>",
        anchor(i),
        swatch(i),
        esc(&e.name)
    );
    if !e.description.trim().is_empty() {
        let _ = writeln!(o, "<p>{}</p>", esc(e.description.trim()));
    }
    o.push_str("<div class=\"cols\"><div>");
    table(o, &tables::details_table(e), "kv");
    o.push_str("</div><div><h3>Final evaluation (best checkpoint)</h3>");
    match tables::eval_table(e) {
        Some(t) => {
            table(o, &t, "eval");
            let _ = write!(o, "<p class=\"note\">{}</p>", esc(FOV_NOTE));
        }
        None => {
            let _ = write!(o, "<p class=\"muted\">{MISSING} not evaluated yet.</p>");
        }
    }
    // The mIoU curve (the figure the experiments are compared on) fills the space
    // beside the details table; loss and accuracy follow side by side.
    let [loss, accuracy, miou] = curves;
    let fig = |rel: &Path, what: &str| -> anyhow::Result<String> {
        Ok(format!(
            "<figure>{}</figure>",
            img(root, rel, &format!("{what} of {}", e.name))?
        ))
    };
    let _ = write!(
        o,
        "<h3>Training curves</h3>{}</div></div>\n<div class=\"figs two\">{}{}",
        fig(miou, "mIoU")?,
        fig(loss, "Train vs valid loss")?,
        fig(accuracy, "Pixel accuracy")?
    );
    o.push_str("</div></section>\n");
    Ok(())
}
