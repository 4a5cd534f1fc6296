//! Options every benchmark of this binary shares (the head-to-head run, `desktop`,
//! `agent-scale`): where the shim and the agent under test are, and ksmd's tunables.

use std::path::PathBuf;

/// The shim and the agent under test.
#[derive(clap::Args, Debug, Clone)]
pub struct ToolArgs {
    /// The shim [default: libksmplus.so next to this binary, in $CARGO_TARGET_DIR/release or target/release].
    #[arg(long)]
    pub preload: Option<PathBuf>,
    /// The agent [default: ksmplus-agentd, searched like --preload].
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

/// ksmd's tunables during every cell (`desktop` scans 2000 pages at a time: see its `main`).
#[derive(clap::Args, Debug, Clone)]
pub struct KsmdArgs {
    /// ksmd pages_to_scan during every cell.
    #[arg(long, default_value_t = 5000)]
    pub pages_to_scan: u32,
    /// ksmd sleep_millisecs during every cell.
    #[arg(long, default_value_t = 10)]
    pub sleep_millisecs: u32,
    /// ksmd use_zero_pages during every cell (0: zero pages merge into a KSM page, as in the thesis).
    #[arg(long, default_value_t = 0)]
    pub use_zero_pages: u32,
    /// The kernel's own defaults, as users run ksmd: pages_to_scan 100, sleep_millisecs 20,
    /// smart_scan 1 under every approach (otherwise smart_scan is 0 except for the smart_scan
    /// approach, so that merge_any and smart_scan differ in that alone).
    #[arg(long, conflicts_with_all = ["pages_to_scan", "sleep_millisecs"])]
    pub ksmd_defaults: bool,
}

impl KsmdArgs {
    /// Applies `--ksmd-defaults` to the tunables.
    pub fn resolved(mut self) -> KsmdArgs {
        if self.ksmd_defaults {
            (self.pages_to_scan, self.sleep_millisecs) = (100, 20);
        }
        self
    }
}
