//! ksmplus-agentd: the per-user agent running the KSM+ heuristic for programs under the shim,
//! and the client side of its control channel (used by `ksmplusctl` and tests).
pub mod log;

pub mod control;
pub mod engine;
pub mod server;

pub mod desktop;
pub mod scan;
pub mod service;

use ksmplus_common::{read_message, write_message, Message};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket path from `--socket`, else `$KSMPLUS_SOCKET`, else the default.
pub fn socket_path(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("KSMPLUS_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    ksmplus_common::default_socket_path(std::env::var("XDG_RUNTIME_DIR").ok().as_deref(), uid)
}

/// The policy path from `--policy`, else the default.
pub fn policy_path(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_owned();
    }
    ksmplus_common::policy::default_policy_path(
        std::env::var("XDG_CONFIG_HOME").ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    )
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("ksmplus-agentd is not running: nothing listens on {0} (start it with `ksmplus-agentd &`, or pass --socket)")]
    NotRunning(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent closed the connection without replying")]
    NoReply,
}

/// Sends one JSON control request and returns the agent's JSON reply.
pub fn control_request(socket: &Path, json: &str) -> Result<String, CtlError> {
    let io_err = |source| CtlError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.kind() == io::ErrorKind::ConnectionRefused =>
        {
            return Err(CtlError::NotRunning(socket.to_owned()))
        }
        Err(e) => return Err(io_err(e)),
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    write_message(
        &mut s,
        &Message::ControlRequest {
            json: json.to_owned(),
        },
    )
    .map_err(io_err)?;
    match read_message(&mut s).map_err(io_err)? {
        Some(Message::ControlReply { json }) => Ok(json),
        _ => Err(CtlError::NoReply),
    }
}
