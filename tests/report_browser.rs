//! Opens the comparison `index.html` from disk in headless Chromium and checks that
//! every image decodes in a real browser, then saves a screenshot of the page.
//!
//! Needs `/usr/bin/chromium` (or `DRIVELINE_CHROMIUM=<path>`); without it the test
//! fails unless `DRIVELINE_SKIP_BROWSER=1` is set.

mod browser;
mod report_support;

use std::path::Path;

use driveline::report::render_comparison;
use report_support::synthetic_summaries;

#[test]
fn index_html_images_load_in_chromium() {
    let Some(bin) = browser::chromium() else {
        return;
    };

    // Persist the report and the screenshot under <target>/test-output/report_browser/.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/report_browser");
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::create_dir_all(&out).unwrap();
    let exps = synthetic_summaries(&out.join("inputs"));
    let report = out.join("report");
    render_comparison("DeepLabV3 on DRIVE — synthetic check", &exps, &report).unwrap();
    let expected = 2 + 3 * exps.len() + exps.iter().map(|e| e.predictions.len()).sum::<usize>();
    let shot = out.join("index.png");
    browser::check_page(&bin, &report.join("index.html"), expected, &shot);
    println!("report: {}", report.display());
    println!("screenshot: {}", shot.display());
}

/// A one-dimensional sweep: the page (with the sweep plot) loads every image, and clicking the
/// results table's headings sorts it (checked against the order computed here).
#[test]
fn sweep_report_renders_and_its_table_sorts_on_click() {
    let Some(bin) = browser::chromium() else {
        return;
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/report_browser_sweep");
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::create_dir_all(&out).unwrap();
    let exps = report_support::sweep_summaries(&out.join("inputs"));
    let report = out.join("report");
    render_comparison("Learning-rate sweep", &exps, &report).unwrap();
    assert!(report.join("sweep.png").is_file(), "no sweep plot");
    // Two comparison plots, the sweep plot, three curves per experiment, the predictions.
    let expected = 3 + 3 * exps.len() + exps.iter().map(|e| e.predictions.len()).sum::<usize>();
    browser::check_page(
        &bin,
        &report.join("index.html"),
        expected,
        &out.join("index.png"),
    );

    let orders = browser::click_headers(
        &bin,
        &report.join("index.html"),
        &["Best valid mIoU", "Best valid mIoU", "lr", "Experiment"],
    );
    let names = |mut v: Vec<&driveline::report::ExperimentSummary>| -> Vec<String> {
        v.dedup_by(|a, b| a.name == b.name);
        v.iter().map(|e| e.name.clone()).collect()
    };
    let given: Vec<String> = exps.iter().map(|e| e.name.clone()).collect();
    assert_eq!(orders[0], given, "rows before any click");
    let mut by_miou: Vec<_> = exps.iter().collect();
    by_miou.sort_by(|a, b| b.best_valid_miou.total_cmp(&a.best_valid_miou));
    assert_eq!(
        orders[1],
        names(by_miou.clone()),
        "after a click on Best valid mIoU (largest first)"
    );
    by_miou.reverse();
    assert_eq!(
        orders[2],
        names(by_miou),
        "after a second click (smallest first)"
    );
    let mut by_lr: Vec<_> = exps.iter().collect();
    let lr = |e: &driveline::report::ExperimentSummary| e.config["train"]["lr"].as_f64().unwrap();
    by_lr.sort_by(|a, b| lr(b).total_cmp(&lr(a)));
    assert_eq!(
        orders[3],
        names(by_lr),
        "after a click on lr (largest first)"
    );
    assert_eq!(
        orders[4],
        [
            "sweep.lr_1e-3",
            "sweep.lr_1e-4",
            "sweep.lr_3e-3",
            "sweep.lr_3e-4"
        ],
        "after a click on Experiment (natural text order)"
    );
    for o in &orders[1..] {
        assert_ne!(o, &orders[0], "a click left the order unchanged");
    }
}
