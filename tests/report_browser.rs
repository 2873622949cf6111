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
