//! Types shared by the ksmplus shim, agent and control CLI.
//!
//! - [`channel`]: the per-process channel page and family doorbell (shim ↔ agent ABI);
//! - [`protocol`]: the socket protocol (a shim's Hello, control requests) and its one framing;
//! - [`names`]: program names, and the default exclusion list every mode honours;
//! - [`fsutil`]: the one atomic-write helper; [`paths`]: XDG directories, ksmplus paths,
//!   peer credentials;
//! - [`maps`]: the one `/proc/PID/maps` parser and what of it ksmplus covers;
//! - [`ksm`]: KSM's sysfs and procfs files; [`policy`] (feature `policy`): the policy file;
//!   [`status`] (feature `policy`): the control channel's typed requests and replies;
//! - [`sys`] (feature `sys`): system calls the agent, ksmplusctl and the bench share, over nix.
pub mod channel;
pub mod fsutil;
pub mod ksm;
pub mod maps;
pub mod names;
pub mod paths;
#[cfg(feature = "policy")]
pub mod policy;
pub mod protocol;
#[cfg(feature = "policy")]
pub mod status;
#[cfg(feature = "sys")]
pub mod sys;

pub use protocol::{
    decode_frame, page_hash, DecodeError, FrameReader, Hello, Message, MAX_FRAME, PROTOCOL_VERSION,
};

use std::io::{self, Read, Write};

/// Reads one whole message from a blocking stream through a [`FrameReader`] of at most
/// `max` bytes per frame. `Ok(None)` on a clean end of stream before any byte of a frame.
pub fn read_message(r: &mut impl Read, max: usize) -> io::Result<Option<Message>> {
    let mut frames = FrameReader::new(max);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match frames.next_message() {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return if frames.pending() == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        frames.push(&buf[..n]);
    }
}

/// Writes one message as a frame to a blocking stream.
pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    w.write_all(&m.to_frame())
}

pub use paths::default_socket_path;
