//! Shared by the `ctl_*` and `install_*` tests: walking a file tree, the 100-column rule of
//! `ksmplusctl status`.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// Every file and symbolic link under `dir` (not following links), relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ksmplus_common::fsutil::files_under(dir, false)
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// Panics naming the first line of `text` wider than 100 columns; lines naming `path` (a
/// temporary directory, whose length the test does not choose) are left out.
pub fn assert_fits_100_columns(text: &str, path: &Path) {
    let path = path.to_string_lossy();
    for l in text.lines().filter(|l| !l.contains(&*path)) {
        assert!(
            l.chars().count() <= 100,
            "over 100 columns: {l:?}\nin:\n{text}"
        );
    }
}

/// Panics naming each of `want` missing from `files`.
pub fn assert_has_files(files: &[PathBuf], want: &[&str]) {
    let missing: Vec<&&str> = want
        .iter()
        .filter(|w| !files.contains(&PathBuf::from(w)))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} in {files:?}");
}
