//! The desktop benchmark's CI smoke, run from a test: `ksmplus-bench desktop --smoke
//! --scenarios ID --require-ksmplus` with the workspace's own shim, agent and ctl.
use crate::shim::{shim_lib, target_bin};
use std::process::Command;

/// Runs one smoke scenario (`D1s` okular, `D5s` firefox) and fails the test with the bench's
/// SMOKE FAILED lines on a miss, keeping its screenshots and logs. Returns without asserting
/// when the bench skipped (it said why; under `KSMPLUS_REQUIRE_KSM=1` it fails instead).
pub fn run_desktop_smoke(scenario: &str) {
    if !crate::require_ksm() {
        return;
    }
    let results = tempfile::tempdir().expect("tempdir");
    let out = Command::new(target_bin("ksmplus-bench"))
        .args([
            "desktop",
            "--smoke",
            "--scenarios",
            scenario,
            "--require-ksmplus",
        ])
        .arg("--results")
        .arg(results.path())
        .arg("--preload")
        .arg(shim_lib())
        .arg("--agent")
        .arg(target_bin("ksmplus-agentd"))
        .arg("--ctl")
        .arg(target_bin("ksmplusctl"))
        .output()
        .expect("run ksmplus-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if stdout.contains("SKIPPED") {
        return;
    }
    if !out.status.success() {
        // Keep the screenshots and logs (the agent's among them) for whoever reads the failure.
        let kept = results.keep();
        panic!(
            "ksmplus-bench desktop --smoke --scenarios {scenario} failed ({}); see the SMOKE FAILED lines above; screenshots and logs kept in {}",
            out.status,
            kept.display()
        );
    }
    assert!(stderr.contains("smoke passed"), "no verdict from the bench");
}
