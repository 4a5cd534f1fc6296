//! The subcommands that talk to the agent: `status` (once or `--watch`), `add`, `remove`,
//! `reload`. Each reply is parsed into its type from `ksmplus_common::status` before anything is
//! printed, so `--json` prints what ksmplusctl understood, and `ok` decides the exit status.
use crate::cli::{AgentArgs, AppArgs, ReloadArgs, StatusArgs};
use crate::client::{self, CtlError};
use crate::output::{exit, fail_with, print_json, shell_quote};
use ksmplus_common::status::{Request, SimpleReply, StatusReply};
use serde::de::DeserializeOwned;
use std::time::{Duration, Instant};

/// Why a request produced no reply of the expected type, with its exit status.
struct Failure {
    code: i32,
    msg: String,
}

impl From<CtlError> for Failure {
    fn from(e: CtlError) -> Failure {
        let code = match e {
            CtlError::NotRunning(_) => exit::NOT_RUNNING,
            _ => exit::FAILED,
        };
        Failure {
            code,
            msg: e.to_string(),
        }
    }
}

/// Sends `req` and parses the reply as `T`; an agent's refusal (a [`SimpleReply`] with an
/// error where `T` was expected) is `Ok` of neither: it comes back as the `SimpleReply`.
fn request<T: DeserializeOwned>(
    agent: &AgentArgs,
    req: &Request,
) -> Result<Result<T, SimpleReply>, Failure> {
    let socket = ksmplus_common::paths::socket_path(agent.socket.as_deref());
    let json = serde_json::to_string(req).expect("a request serialises");
    let text = client::control_request(&socket, &json)?;
    if let Ok(v) = serde_json::from_str::<T>(&text) {
        return Ok(Ok(v));
    }
    match serde_json::from_str::<SimpleReply>(&text) {
        Ok(s) if !s.ok => Ok(Err(s)),
        _ => Err(Failure {
            code: exit::FAILED,
            msg: format!(
                "unexpected reply from the agent at {} (a ksmplus-agentd of another version?): {}",
                socket.display(),
                text.chars().take(200).collect::<String>()
            ),
        }),
    }
}

fn refused(s: &SimpleReply, json_out: bool) -> i32 {
    if json_out {
        print_json(s);
    } else {
        eprintln!(
            "ksmplusctl: {}",
            s.error
                .as_deref()
                .unwrap_or("the agent refused the request")
        );
    }
    exit::REFUSED
}

/// `ksmplusctl status [--watch [SECONDS] [--count N]]`.
pub fn status(a: &StatusArgs) -> i32 {
    let json_out = a.out.json;
    let Some(every) = a.watch else {
        return status_once(a, json_out, false);
    };
    if !(every.is_finite() && every > 0.0) {
        return fail_with(
            exit::FAILED,
            "--watch needs a positive number of seconds",
            json_out,
        );
    }
    let every = Duration::from_secs_f64(every.max(0.1));
    let tty = !json_out && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        if tty {
            // Home and clear, as watch(1) does.
            print!("\x1b[H\x1b[2J");
        }
        // Keep going while the agent is away (a restart): each refresh says so. With --count
        // the last refresh decides the exit status.
        let code = status_once(a, json_out, tty);
        n += 1;
        if a.count.is_some_and(|c| n >= c) {
            return code;
        }
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
}

fn status_once(a: &StatusArgs, json_out: bool, stamp: bool) -> i32 {
    match request::<StatusReply>(&a.agent, &Request::Status) {
        Ok(Ok(st)) => {
            if json_out {
                print_json(&st);
            } else {
                if stamp {
                    println!(
                        "ksmplusctl status, every {}s (Ctrl-C to stop)",
                        a.watch.unwrap_or(2.0)
                    );
                }
                print!("{}", crate::table::render(&st));
            }
            if st.ok {
                exit::OK
            } else {
                exit::REFUSED
            }
        }
        Ok(Err(s)) => refused(&s, json_out),
        Err(f) => fail_with(f.code, &f.msg, json_out),
    }
}

/// `ksmplusctl add APP` / `remove APP`.
pub fn edit(a: &AppArgs, add: bool) -> i32 {
    let json_out = a.out.json;
    let req = if add {
        Request::Add { app: a.app.clone() }
    } else {
        Request::Remove { app: a.app.clone() }
    };
    match request::<SimpleReply>(&a.agent, &req) {
        Ok(Ok(v)) if v.ok => {
            if json_out {
                print_json(&v);
                return exit::OK;
            }
            let policy = v.policy.as_deref().unwrap_or("the policy file");
            let name = shell_quote(&a.app);
            let verb = if add { "added to" } else { "removed from" };
            if v.changed == Some(true) {
                println!("{name}: {verb} {policy}; policy reloaded (running programs included)");
            } else {
                println!("{name}: nothing to change in {policy}");
            }
            exit::OK
        }
        Ok(Ok(v)) | Ok(Err(v)) => refused(&v, json_out),
        Err(f) => fail_with(f.code, &f.msg, json_out),
    }
}

/// `ksmplusctl reload`.
pub fn reload(a: &ReloadArgs) -> i32 {
    let json_out = a.out.json;
    match request::<SimpleReply>(&a.agent, &Request::Reload) {
        Ok(Ok(v)) if v.ok => {
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "policy reloaded from {}",
                    v.policy.as_deref().unwrap_or("the policy file")
                );
            }
            exit::OK
        }
        Ok(Ok(v)) | Ok(Err(v)) => refused(&v, json_out),
        Err(f) => fail_with(f.code, &f.msg, json_out),
    }
}
