//! Locating `libksmplus.so` and running commands under it.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `libksmplus.so` is: `$KSMPLUS_LIB`, else `<target>/<profile>/libksmplus.so` found by
/// walking up from the running executable (a test binary lives in `<target>/<profile>/deps/`,
/// a bin in `<target>/<profile>/`). The executable's own profile is preferred; `profile`
/// (`"debug"`/`"release"`) forces one. Panics telling how to build it when it is missing.
pub fn shim_lib_for(profile: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os("KSMPLUS_LIB") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KSMPLUS_LIB={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1) {
        let own = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let target = if own == "debug" || own == "release" {
            dir.parent()
        } else {
            continue;
        };
        let Some(target) = target else { continue };
        let order: Vec<&str> = match profile {
            Some(p) => vec![p],
            None if own == "release" => vec!["release", "debug"],
            None => vec!["debug", "release"],
        };
        for prof in order {
            let cand = target.join(prof).join("libksmplus.so");
            if cand.is_file() {
                return cand;
            }
            tried.push(cand);
        }
        break;
    }
    panic!(
        "libksmplus.so not found (tried {tried:?}). Build the shim first with the same target dir: \
         `cargo build -p ksmplus-preload{}` (or set KSMPLUS_LIB=/path/to/libksmplus.so)",
        if profile == Some("release") { " --release" } else { "" }
    );
}

/// [`shim_lib_for`] with the executable's own profile preferred.
pub fn shim_lib() -> PathBuf {
    shim_lib_for(None)
}

/// `<target>/<profile>/<name>`: a binary of the workspace (`ksmplus-agentd`, `ksmplusctl`, ...)
/// built into the profile this test was built with.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    for dir in exe.ancestors().skip(1) {
        let own = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if own == "debug" || own == "release" {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "{} not found: build it first with `cargo build --workspace` (same target dir{})",
                p.display(),
                if own == "release" { ", --release" } else { "" }
            );
            return p;
        }
    }
    panic!("cannot locate the target dir from {}", exe.display());
}

/// How a command runs with respect to the shim.
#[derive(Clone, Debug)]
pub enum ShimMode {
    /// No `LD_PRELOAD` at all.
    Off,
    /// Under the shim, talking to the socket at this path (which may have no listener).
    On { socket: PathBuf },
    /// Under the shim with `KSMPLUS_DISABLE=1`.
    Disabled,
}

impl ShimMode {
    /// Sets (or clears) the environment of `cmd` for this mode, with `lib` as the shim.
    /// Every `KSMPLUS_*` variable inherited from the test's own environment is removed first.
    pub fn apply(&self, cmd: &mut Command, lib: &Path) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KSMPLUS_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env_remove("LD_PRELOAD");
        match self {
            ShimMode::Off => {}
            ShimMode::On { socket } => {
                cmd.env("LD_PRELOAD", lib).env("KSMPLUS_SOCKET", socket);
            }
            ShimMode::Disabled => {
                cmd.env("LD_PRELOAD", lib).env("KSMPLUS_DISABLE", "1");
            }
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self, ShimMode::On { .. })
    }
}

/// Panics if `stderr` shows the dynamic loader could not preload the library (it then runs the
/// program without it, which would make a "same output" test pass for the wrong reason).
pub fn assert_preloaded(stderr: &[u8]) {
    let s = String::from_utf8_lossy(stderr);
    assert!(
        !s.contains("ld.so: object") && !s.contains("cannot be preloaded"),
        "the shim was not preloaded: {s}"
    );
}

/// `Command::new(program)` with the environment of `mode` applied (shim from [`shim_lib`]).
pub fn command(program: impl AsRef<std::ffi::OsStr>, mode: &ShimMode) -> Command {
    let mut c = Command::new(program);
    mode.apply(&mut c, &shim_lib());
    c
}

/// The `comm` the kernel gives a process running `exe`: its file name cut to 15 bytes.
pub fn expected_comm(exe: &Path) -> String {
    let name = exe.file_name().unwrap().to_string_lossy();
    name.bytes().take(15).map(char::from).collect()
}
