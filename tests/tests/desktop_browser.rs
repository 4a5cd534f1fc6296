//! CI's reduced browser experiment (issue 10): firefox-esr with two local pages, its sandbox
//! on, run as an unprivileged user under `merge_any` and under ksmplus (shim + an agent of that
//! user), headless under Xvfb, driven with xdotool.
//!
//! It runs `ksmplus-bench desktop --smoke --scenarios D5s`, which asserts: Firefox shows a
//! window, scrolls and switches tabs before and after merging; every process of it present
//! when ksmd started is still alive at the end (a process killed meanwhile is named with its
//! signal); under ksmplus every process maps libksmplus.so and is tracked by the agent
//! (`ksmplusctl status --json`), and the profit is positive; ksmplus merges at least 3/4 of
//! merge_any's pages with at most 3/5 of its rmap items (issue 10's 0.9x and 1/5 are printed as
//! targets, see docs/DESKTOP-BENCH.md). The bench creates its browser user (`ksmplus-bench`,
//! `useradd --system`) when missing. Skips (with the reason) without root/KSM or without Xvfb,
//! xdotool, firefox-esr — unless `KSMPLUS_REQUIRE_KSM=1`, as in CI.
use ksmplus_tests::target_bin;
use std::process::Command;

#[test]
fn firefox_two_tabs_sandboxed_under_merge_any_and_ksmplus() {
    if !ksmplus_tests::require_ksm() {
        return;
    }
    let bench = target_bin("ksmplus-bench");
    let agent = target_bin("ksmplus-agentd");
    let ctl = target_bin("ksmplusctl");
    let lib = ksmplus_tests::shim_lib();
    let results = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&bench)
        .arg("desktop")
        .arg("--smoke")
        .arg("--scenarios")
        .arg("D5s")
        .arg("--require-ksmplus")
        .arg("--results")
        .arg(results.path())
        .arg("--preload")
        .arg(&lib)
        .arg("--agent")
        .arg(&agent)
        .arg("--ctl")
        .arg(&ctl)
        .output()
        .expect("run ksmplus-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if stdout.contains("SKIPPED") {
        // The bench printed why (missing Xvfb/firefox-esr/xdotool); with KSMPLUS_REQUIRE_KSM=1
        // it fails instead of skipping.
        return;
    }
    if !out.status.success() {
        // Keep the screenshots and logs (the agent's among them) for whoever reads the failure.
        let kept = results.keep();
        panic!(
            "ksmplus-bench desktop --smoke --scenarios D5s failed ({}); see the SMOKE FAILED lines above; screenshots and logs kept in {}",
            out.status,
            kept.display()
        );
    }
    assert!(stderr.contains("smoke passed"), "no verdict from the bench");
}
