//! `ksmplus-agentd`: serves the shims of one user and runs the KSM+ engine.
use clap::Parser;
use ksmplus_agentd::cli::Args;
use ksmplus_agentd::server::{Agent, Options};
use ksmplus_agentd::{error, info, logger};
use ksmplus_common::policy::Policy;
use std::path::PathBuf;

fn main() {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        match ksmplus_agentd::cli::write_man_page(dir) {
            Ok(p) => {
                println!("{}", p.display());
                return;
            }
            Err(e) => {
                eprintln!(
                    "ksmplus-agentd: cannot write the man page into {}: {e}",
                    dir.display()
                );
                std::process::exit(2);
            }
        }
    }
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
