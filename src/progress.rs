//! Progress reporting for long stages: an indicatif bar with ETA on a terminal, plain log
//! lines (every ~10 %) otherwise, so CI logs and redirected output stay readable.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Creates bars for one stage.
#[derive(Debug, Clone)]
pub struct Progress {
    prefix: String,
    terminal: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(prefix: &str, quiet: bool) -> Progress {
        Progress {
            prefix: prefix.to_string(),
            terminal: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Log one line on stderr (suppressed when quiet).
    pub fn log(&self, msg: &str) {
        if !self.quiet {
            eprintln!("  {}: {msg}", self.prefix);
        }
    }

    /// A bar over `len` units of work, labelled `what`.
    pub fn bar(&self, len: u64, what: &str) -> Bar {
        let pb = if self.terminal && !self.quiet {
            let pb = ProgressBar::new(len);
            let style = ProgressStyle::with_template(
                "  {prefix} {msg:<12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            pb.set_style(style);
            pb.set_prefix(format!("{}:", self.prefix));
            pb.set_message(what.to_string());
            Some(pb)
        } else {
            None
        };
        Bar {
            pb,
            len,
            pos: 0,
            last_logged: 0,
            what: what.to_string(),
            prefix: self.prefix.clone(),
            quiet: self.quiet,
            start: Instant::now(),
            suffix: String::new(),
        }
    }
}

/// One running bar; `inc` it as work completes.
pub struct Bar {
    pb: Option<ProgressBar>,
    len: u64,
    pos: u64,
    last_logged: u64,
    what: String,
    prefix: String,
    quiet: bool,
    start: Instant,
    suffix: String,
}

impl Bar {
    /// Extra text shown after the bar (e.g. the running loss).
    pub fn set_suffix(&mut self, s: String) {
        if let Some(pb) = &self.pb {
            pb.set_message(format!("{} {s}", self.what));
        }
        self.suffix = s;
    }

    pub fn inc(&mut self, n: u64) {
        self.pos += n;
        if let Some(pb) = &self.pb {
            pb.inc(n);
            return;
        }
        if self.quiet || self.len == 0 {
            return;
        }
        let step = (self.len / 10).max(1);
        if self.pos >= self.last_logged + step || self.pos == self.len {
            self.last_logged = self.pos;
            let el = self.start.elapsed().as_secs_f64();
            let eta = if self.pos > 0 {
                el / self.pos as f64 * (self.len - self.pos.min(self.len)) as f64
            } else {
                0.0
            };
            eprintln!(
                "  {}: {} {}/{} ({:.0}%) {:.1}s elapsed, ETA {:.0}s {}",
                self.prefix,
                self.what,
                self.pos,
                self.len,
                100.0 * self.pos as f64 / self.len as f64,
                el,
                eta,
                self.suffix
            );
        }
    }

    pub fn finish(self) {
        if let Some(pb) = self.pb {
            pb.finish_and_clear();
        }
    }
}
