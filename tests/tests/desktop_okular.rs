//! CI's reduced desktop experiment (issue 7): two okular instances, each with its own PDF, under
//! `merge_any` and under ksmplus (shim + agent), headless under Xvfb, driven with xdotool.
//!
//! It runs `ksmplus-bench desktop --smoke --scenarios D1s` (the browser is
//! `desktop_browser.rs`), which asserts: every okular shows a window and
//! processes page turns before and after merging and is alive at the end; under ksmplus each
//! maps libksmplus.so, is tracked by the agent (`ksmplusctl status --json`) and has a positive
//! `ksm_process_profit`; ksmplus's rmap items that never merge are at most 1/5 of merge_any's.
//! Skips (with the reason) without root/KSM or without Xvfb, xdotool, okular — unless
//! `KSMPLUS_REQUIRE_KSM=1`, as in CI.

#[test]
fn okular_x2_under_merge_any_and_ksmplus() {
    ksmplus_tests::desktop_smoke::run_desktop_smoke("D1s");
}
