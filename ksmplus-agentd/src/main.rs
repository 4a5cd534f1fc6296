//! `ksmplus-agentd`: serves the shims of one user and runs the KSM+ engine.
use clap::Parser;
use ksmplus_agentd::server::{Agent, Options};
use ksmplus_agentd::{error, info, logger};
use ksmplus_common::policy::Policy;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "KSM+ agent: finds duplicate pages in programs run under libksmplus.so and marks them for ksmd"
)]
struct Args {
    /// Socket to listen on [default: $KSMPLUS_SOCKET, else $XDG_RUNTIME_DIR/ksmplus/agent.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Policy file [default: $XDG_CONFIG_HOME/ksmplus/policy.toml]; a missing file means defaults
    #[arg(long)]
    policy: Option<PathBuf>,
    /// More log output (-v info, -vv debug); also KSMPLUS_LOG=info|debug
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Check the policy file, print the effective policy and exit
    #[arg(long)]
    check_policy: bool,
    /// What the agent learns and keeps across runs [default: $XDG_STATE_HOME/ksmplus/learned]
    #[arg(long)]
    state: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    logger::init(args.verbose, std::env::var("KSMPLUS_LOG").ok().as_deref());
    let socket = ksmplus_common::paths::socket_path(args.socket.as_deref());
    let policy_path = ksmplus_common::paths::policy_path(args.policy.as_deref());
    let policy = match Policy::load(&policy_path) {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            std::process::exit(2);
        }
    };
    if args.check_policy {
        println!("{}: ok\n{policy:#?}", policy_path.display());
        return;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (std::process::id() as u64) << 32;
    let opts = Options {
        socket: socket.clone(),
        policy_path,
        root: PathBuf::from("/"),
        seed,
        state: ksmplus_common::paths::state_path(args.state.as_deref()),
    };
    let mut agent = match Agent::new(opts, policy) {
        Ok(a) => a,
        Err(e) => {
            error!("cannot listen on {}: {e}", socket.display());
            std::process::exit(1);
        }
    };
    if let Err(e) = agent.install_signals() {
        error!("signals: {e}");
        std::process::exit(1);
    }
    info!("listening on {}", socket.display());
    if let Err(e) = agent.run() {
        error!("event loop: {e}");
        std::process::exit(1);
    }
}
