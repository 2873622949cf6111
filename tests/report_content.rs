//! Content of the rendered reports: tables, referenced images, CSV, plots.

mod report_support;

use std::fs;
use std::path::Path;

use driveline::report::{
    fmt_metric, render_comparison, render_experiment, write_summary_csv, ExperimentSummary,
    SUMMARY_CSV_HEADER,
};
use report_support::synthetic_summaries;

/// Targets of every Markdown image `![alt](target)` in `md`.
fn markdown_images(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(start) = rest.find("![") {
        rest = &rest[start + 2..];
        let Some(mid) = rest.find("](") else { break };
        let after = &rest[mid + 2..];
        let end = after.find(')').expect("unclosed image link");
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

/// Table row of `README.md` whose first cell is `name`.
fn row_of<'a>(md: &'a str, name: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no table row for {name} in README.md"))
}

fn render(dir: &Path) -> Vec<ExperimentSummary> {
    let exps = synthetic_summaries(&dir.join("inputs"));
    render_comparison("DeepLabV3 on DRIVE", &exps, &dir.join("report")).unwrap();
    exps
}

#[test]
fn comparison_readme_has_rows_and_decodable_images() {
    let tmp = tempfile::tempdir().unwrap();
    let exps = render(tmp.path());
    let report = tmp.path().join("report");
    let md = fs::read_to_string(report.join("README.md")).unwrap();

    assert!(md.starts_with("# DeepLabV3 on DRIVE\n"));
    for e in &exps {
        let row = row_of(&md, &e.name);
        assert!(
            row.contains(&fmt_metric(e.best_valid_miou)),
            "row of {} lacks its best mIoU: {row}",
            e.name
        );
        assert!(
            md.contains(&format!("### {}", e.name)),
            "no section for {}",
            e.name
        );
    }
    // Experiment with test metrics: formatted test mIoU; without: em dashes.
    let a = row_of(&md, "deeplabv3_resnet50_512");
    assert!(a.contains("| 0.8012 |"), "{a}");
    assert!(md.contains(
        "| deeplabv3_resnet50_512 | 1 h 02 min | 5.09 GiB | 39.64 M | cpu (2 threads) |"
    ));
    let b = row_of(&md, "deeplabv3_resnet101_768");
    assert!(
        b.contains("| — | — | — |"),
        "missing AUC/test should be dashes: {b}"
    );
    let c = row_of(&md, "unet_crops96");
    assert!(
        c.contains("| unet | — | native crops 96 | 6000 steps | step 5800 |"),
        "{c}"
    );
    // The best experiment is emphasised.
    let best = exps
        .iter()
        .max_by(|x, y| x.best_valid_miou.total_cmp(&y.best_valid_miou))
        .unwrap();
    assert!(row_of(&md, &best.name).contains(&format!("**{}**", fmt_metric(best.best_valid_miou))));
    // HTML in a description is escaped.
    assert!(md.contains("&lt;768 px&gt;") && !md.contains("<768"));

    // 2 comparison charts + 3 curves per experiment + 8 prediction overlays.
    let images = markdown_images(&md);
    assert_eq!(images.len(), 2 + 3 * exps.len() + 8, "{images:?}");
    for rel in &images {
        assert!(
            !rel.starts_with('/') && !rel.contains(".."),
            "not a relative path: {rel}"
        );
        let img = image::open(report.join(rel))
            .unwrap_or_else(|e| panic!("README.md image {rel} does not decode: {e}"));
        assert!(img.width() > 0 && img.height() > 0);
    }
    // The grid shows a dash where an experiment has no prediction for an image.
    let grid_row = md.lines().find(|l| l.starts_with("| 03 |")).unwrap();
    assert!(grid_row.trim_end().ends_with("| — |"), "{grid_row}");
}

#[test]
fn summary_csv_has_one_row_per_experiment() {
    let tmp = tempfile::tempdir().unwrap();
    let exps = render(tmp.path());
    let mut rdr = csv::Reader::from_path(tmp.path().join("report/summary.csv")).unwrap();
    let headers: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(headers, SUMMARY_CSV_HEADER);
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), exps.len());
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    for (row, e) in rows.iter().zip(&exps) {
        assert_eq!(&row[col("name")], e.name);
        let miou: f64 = row[col("best_valid_miou")].parse().unwrap();
        assert_eq!(miou, e.best_valid_miou, "full precision round trip");
        assert_eq!(row[col("params")].parse::<u64>().unwrap(), e.param_count);
    }
    assert_eq!(&rows[0][col("test_miou")], "0.8012");
    assert_eq!(&rows[0][col("valid_auc")], "0.9712", "FOV entry preferred");
    assert_eq!(
        &rows[1][col("valid_auc")],
        "",
        "missing AUC is an empty field"
    );
    assert_eq!(&rows[2][col("test_miou")], "");
    assert_eq!(&rows[2][col("unit")], "step");
}

#[test]
fn write_summary_csv_handles_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let mut exps = synthetic_summaries(&tmp.path().join("inputs"));
    exps[0].best_valid_miou = f64::NAN;
    let path = tmp.path().join("s.csv");
    write_summary_csv(&exps[..1], &path).unwrap();
    let mut rdr = csv::Reader::from_path(&path).unwrap();
    let row = rdr.records().next().unwrap().unwrap();
    assert_eq!(&row[7], "");
}

#[test]
fn html_is_self_contained_and_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let exps = render(tmp.path());
    let html = fs::read_to_string(tmp.path().join("report/index.html")).unwrap();
    for e in &exps {
        assert!(
            html.contains(&format!(">{}</td>", e.name)),
            "no summary row for {}",
            e.name
        );
    }
    let srcs: Vec<&str> = html.split("<img src=\"").skip(1).collect();
    assert_eq!(srcs.len(), 2 + 3 * exps.len() + 8);
    assert!(srcs.iter().all(|s| s.starts_with("data:image/png;base64,")));
    for bad in ["http://", "https://", "<link", "@import", "url("] {
        assert!(
            !html.contains(bad),
            "external resource marker {bad:?} in index.html"
        );
    }
    assert!(html.contains("&lt;768 px&gt; &amp; no test labels"));
}

#[test]
fn experiment_report_writes_curves_and_readme() {
    let tmp = tempfile::tempdir().unwrap();
    let exps = synthetic_summaries(&tmp.path().join("inputs"));
    let e = &exps[0];
    let out = tmp.path().join("one");
    render_experiment(e, &out).unwrap();
    let md = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(md.starts_with(&format!("# {}\n", e.name)));
    assert!(md.contains(&format!("| Best epoch | {} |", e.best_epoch)));
    assert!(md.contains("| test (FOV) | "));
    for f in ["loss.png", "accuracy.png", "miou.png"] {
        assert!(md.contains(&format!("]({f})")), "README.md lacks {f}");
        let img = image::open(out.join(f)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (960, 600));
        // The valid curve (orange) and the train curve (blue) were drawn.
        let near = |c: [u8; 3]| {
            img.pixels()
                .filter(|p| p.0.iter().zip(c).all(|(a, b)| a.abs_diff(b) < 12))
                .count()
        };
        assert!(near([255, 127, 14]) > 200, "{f}: valid curve missing");
        assert!(near([31, 119, 180]) > 200, "{f}: train curve missing");
        // Title text was rasterised (dark pixels in the caption band).
        let dark = (0..960)
            .flat_map(|x| (0..50).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 100))
            .count();
        assert!(dark > 100, "{f}: no title text drawn");
    }
}

#[test]
fn empty_history_and_missing_prediction_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut exps = synthetic_summaries(&tmp.path().join("inputs"));
    exps[2].history.clear();
    render_experiment(&exps[2], &tmp.path().join("empty")).unwrap();
    assert!(image::open(tmp.path().join("empty/miou.png")).is_ok());

    let gone = exps[1].predictions[0].mask_png.clone();
    fs::remove_file(&gone).unwrap();
    let err = render_comparison("x", &exps, &tmp.path().join("r")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&gone.display().to_string()), "{msg}");
}

#[test]
fn summaries_round_trip_through_json() {
    let tmp = tempfile::tempdir().unwrap();
    let exps = synthetic_summaries(&tmp.path().join("inputs"));
    let json = serde_json::to_string_pretty(&exps).unwrap();
    let back: Vec<ExperimentSummary> = serde_json::from_str(&json).unwrap();
    // serde_json may round the last bit of a float; everything else is exact.
    assert_eq!(back.len(), exps.len());
    for (b, e) in back.iter().zip(&exps) {
        assert_eq!(
            (&b.name, &b.imgsz, b.unit, b.epochs),
            (&e.name, &e.imgsz, e.unit, e.epochs)
        );
        assert_eq!(b.predictions, e.predictions);
        assert_eq!(b.history.len(), e.history.len());
        assert_eq!(b.eval.len(), e.eval.len());
        assert!((b.best_valid_miou - e.best_valid_miou).abs() < 1e-12);
        let (hb, he) = (b.history.last().unwrap(), e.history.last().unwrap());
        assert_eq!(hb.train_miou.is_some(), he.train_miou.is_some());
        assert!((hb.miou - he.miou).abs() < 1e-12);
    }
    // Optional fields may be omitted by the writer.
    let minimal = r#"{"name":"m","arch":"unet","imgsz":"96","epochs":1,"best_epoch":1,
        "best_valid_miou":0.5,"best_valid_dice":0.4,"train_seconds":1.0,
        "peak_rss_mib":10.0,"param_count":5,"device":"cpu"}"#;
    let m: ExperimentSummary = serde_json::from_str(minimal).unwrap();
    assert!(m.history.is_empty() && m.predictions.is_empty() && m.backbone.is_empty());
}

#[test]
fn single_experiment_nan_best_and_empty_list() {
    let tmp = tempfile::tempdir().unwrap();
    let mut exps = synthetic_summaries(&tmp.path().join("inputs"));
    exps.truncate(1);
    exps[0].best_valid_miou = f64::NAN;
    exps[0].predictions.clear();
    let out = tmp.path().join("one");
    render_comparison("single", &exps, &out).unwrap();
    let bars = image::open(out.join("best_valid_miou.png")).unwrap();
    assert_eq!(bars.width(), 960);
    let md = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(md.contains("— no predictions recorded."));
    assert!(row_of(&md, &exps[0].name).contains("| — |"));

    let err = render_comparison("none", &[], &tmp.path().join("none")).unwrap_err();
    assert!(err.to_string().contains("no experiments"), "{err}");
}
