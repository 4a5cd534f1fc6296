//! Compiling the C workloads of `tests/c` with `cc -O2 -pthread`, cached by source hash.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding the C sources (`tests/c`).
pub fn c_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c")
}

/// Compiles `tests/c/<name>.c` and returns the executable's path. The result is cached in
/// `$TMPDIR/ksmplus-tests-cc/<name>-<hash>` where the hash covers the source and the flags, so
/// concurrent tests and repeated runs compile once. Panics with the compiler's output on error.
pub fn compile(name: &str) -> PathBuf {
    compile_with(name, &[])
}

/// [`compile`] with extra compiler flags.
pub fn compile_with(name: &str, extra: &[&str]) -> PathBuf {
    let src = c_dir().join(format!("{name}.c"));
    let text = std::fs::read(&src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    let mut key = text.clone();
    for f in extra {
        key.extend_from_slice(f.as_bytes());
        key.push(0);
    }
    let hash = ksmplus_common::page_hash(&key);
    let dir = std::env::temp_dir().join("ksmplus-tests-cc");
    std::fs::create_dir_all(&dir).expect("create the compile cache dir");
    let out = dir.join(format!("{name}-{hash:016x}"));
    if out.is_file() {
        return out;
    }
    // Compile to a private name, then rename: a concurrent test never sees a partial file.
    let tmp = dir.join(format!(
        "{name}-{hash:016x}.{}.{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    let res = Command::new("cc")
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&tmp)
        .arg(&src)
        .args(extra)
        .output()
        .expect("run cc");
    assert!(
        res.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    std::fs::rename(&tmp, &out).expect("rename the compiled program");
    out
}
