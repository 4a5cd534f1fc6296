//! The client side of the agent's control channel: one request, one reply, from an agent that
//! must be this user's (or root's).

use crate::output::shell_quote;
use ksmplus_common::{read_message, write_message, Message};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "ksmplus-agentd is not running: nothing listens on {} (start it: \
         `systemctl --user start ksmplus-agentd`, or `ksmplus-agentd &`; or pass --socket PATH)",
        shell_quote(&.0.to_string_lossy())
    )]
    NotRunning(PathBuf),
    #[error("{path} is served by uid {uid}, not by this user or root: refusing to talk to it")]
    ForeignPeer { path: PathBuf, uid: u32 },
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
    // Whoever listens there must be this user's agent (or root's): another user who took over
    // the socket's place must not get our commands or feed us answers.
    {
        let me = nix::unistd::geteuid().as_raw();
        match ksmplus_common::paths::peer_cred(&s) {
            Ok((_, uid)) if uid == me || uid == 0 => {}
            Ok((_, uid)) => {
                return Err(CtlError::ForeignPeer {
                    path: socket.to_owned(),
                    uid,
                })
            }
            Err(e) => return Err(io_err(e.into())),
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    write_message(
        &mut s,
        &Message::ControlRequest {
            json: json.to_owned(),
        },
    )
    .map_err(io_err)?;
    match read_message(&mut s, ksmplus_common::MAX_FRAME).map_err(io_err)? {
        Some(Message::ControlReply { json }) => Ok(json),
        _ => Err(CtlError::NoReply),
    }
}
