//! `ksmplusctl`: asks a running ksmplus-agentd for its status, edits its policy, reloads it
//! (`control`); and, without an agent, wraps desktop programs (`desktop`), scans for duplicate
//! pages (`scan`), writes the user unit (`service`) and the boot-time ksmd file (`tmpfiles`)
//! and, at build time, its own man pages and completions (`generate`). The command line is in `cli`; exit statuses and the JSON contract
//! in `output`.
mod cli;
mod client;
mod control;
mod desktop;
mod generate;
mod output;
mod scan;
mod service;
mod table;
#[cfg(test)]
mod test_util;
mod tmpfiles;

use clap::Parser;
use cli::Cmd;

fn main() {
    // Like every Unix filter: `ksmplusctl status | head` ends quietly when the reader goes
    // away, instead of panicking on a broken pipe (Rust ignores SIGPIPE by default).
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: restoring the default disposition of SIGPIPE (no handler of ours runs) before
    // any thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let cmd = match cli::Args::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ksmplusctl: {e}");
            std::process::exit(output::exit::FAILED);
        }
    };
    let code = match &cmd {
        Cmd::Status(a) => control::status(a),
        Cmd::Add(a) => control::edit(a, true),
        Cmd::Remove(a) => control::edit(a, false),
        Cmd::Reload(a) => control::reload(a),
        Cmd::Scan(a) => scan::cli(a),
        Cmd::Wrap(a) => desktop::cli_wrap(a),
        Cmd::Unwrap(a) => desktop::cli_unwrap(a),
        Cmd::Wrapped(j) => desktop::cli_wrapped(j.json),
        Cmd::InstallService(a) => service::cli_install(a),
        Cmd::Tmpfiles(a) => tmpfiles::cli(a),
        Cmd::Generate(a) => generate::cli(a),
    };
    std::process::exit(code);
}
