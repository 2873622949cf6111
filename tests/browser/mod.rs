//! Headless Chromium for the report tests: open a page from disk, read the image marker the
//! page's load handler sets (`<body data-images="ok:N">` or `broken:<alts>`), and save a
//! screenshot.
//!
//! Needs `/usr/bin/chromium` (or `DRIVELINE_CHROMIUM=<path>`); without it the check fails
//! unless `DRIVELINE_SKIP_BROWSER=1` is set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Chromium binary (`DRIVELINE_CHROMIUM` or `/usr/bin/chromium`), or `None` when it is
/// missing and `DRIVELINE_SKIP_BROWSER=1` asks to skip. Panics when it is missing otherwise.
pub fn chromium() -> Option<PathBuf> {
    let bin = std::env::var_os("DRIVELINE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if bin.is_file() {
        return Some(bin);
    }
    if std::env::var("DRIVELINE_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("chromium not installed; skipped because DRIVELINE_SKIP_BROWSER=1");
        return None;
    }
    panic!(
        "headless Chromium is needed for this test but {} does not exist: \
         install it (`apt-get install -y chromium`), point DRIVELINE_CHROMIUM at it, \
         or set DRIVELINE_SKIP_BROWSER=1 to skip",
        bin.display()
    );
}

/// Runs headless Chromium on `url` with `extra` arguments and a fresh profile.
pub fn run_chromium(bin: &Path, extra: &[String], url: &str) -> Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("failed to start chromium")
}

/// Loads `index` in Chromium, asserts that all `expected` images decoded, and saves a
/// 1280×2400 screenshot to `shot` (asserted to decode and not be blank).
pub fn check_page(bin: &Path, index: &Path, expected: usize, shot: &Path) {
    let url = format!("file://{}", index.canonicalize().unwrap().display());
    let dom = run_chromium(bin, &["--dump-dom".into()], &url);
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed ({}): {}",
        dom.status,
        String::from_utf8_lossy(&dom.stderr)
    );
    let html = String::from_utf8_lossy(&dom.stdout);
    let marker = html
        .split("data-images=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no data-images marker on <body>; the load handler did not run"));
    assert_eq!(
        marker,
        format!("ok:{expected}"),
        "images that did not load in Chromium"
    );

    let res = run_chromium(
        bin,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2400".into(),
        ],
        &url,
    );
    assert!(
        res.status.success(),
        "chromium --screenshot failed ({}): {}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    let img = image::open(shot)
        .unwrap_or_else(|e| panic!("screenshot {} does not decode: {e}", shot.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), (1280, 2400));
    let first = *img.get_pixel(0, 0);
    let differing = img.pixels().filter(|p| **p != first).count();
    assert!(
        differing > img.pixels().len() / 10,
        "screenshot looks blank: only {differing} pixels differ from the corner"
    );
}

/// Clicks, in order, the headers of the page's first `table.sortable` whose text is in
/// `headers` (a real `click` event on each `<th>`, as a user's), and returns the first-column
/// text of the rows before any click and after each one. The page is `index` with a probe
/// script appended (written beside it as `<stem>.probe.html`, so relative links still work).
pub fn click_headers(bin: &Path, index: &Path, headers: &[&str]) -> Vec<Vec<String>> {
    let html = std::fs::read_to_string(index).unwrap();
    let list: Vec<String> = headers.iter().map(|h| format!("{h:?}")).collect();
    let script = format!(
        r#"<script>
window.addEventListener('load', function () {{
  var table = document.querySelector('table.sortable');
  if (!table) {{ document.body.dataset.probe = 'no sortable table'; return; }}
  function order() {{
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {{
      return r.cells[0].textContent.trim();
    }}).join('|');
  }}
  var out = [order()];
  [{}].forEach(function (h) {{
    var th = Array.prototype.find.call(table.tHead.rows[0].cells, function (c) {{
      return c.textContent.trim() === h;
    }});
    if (!th) {{ out.push('no header ' + h); return; }}
    th.click();
    out.push(order());
  }});
  document.body.dataset.probe = out.join(';');
}});
</script>
</body>"#,
        list.join(", ")
    );
    assert!(
        html.contains("</body>"),
        "{} has no </body>",
        index.display()
    );
    let probe = index.with_extension("probe.html");
    std::fs::write(&probe, html.replacen("</body>", &script, 1)).unwrap();
    let url = format!("file://{}", probe.canonicalize().unwrap().display());
    let dom = run_chromium(bin, &["--dump-dom".into()], &url);
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed ({}): {}",
        dom.status,
        String::from_utf8_lossy(&dom.stderr)
    );
    let text = String::from_utf8_lossy(&dom.stdout);
    let marker = text
        .split("data-probe=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no data-probe marker: the probe script did not run"))
        .replace("&amp;", "&");
    let orders: Vec<Vec<String>> = marker
        .split(';')
        .map(|o| o.split('|').map(str::to_string).collect())
        .collect();
    assert_eq!(
        orders.len(),
        headers.len() + 1,
        "probe result {marker:?} (a header was not found?)"
    );
    orders
}
