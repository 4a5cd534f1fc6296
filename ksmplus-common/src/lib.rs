//! Types shared by the ksmplus shim, agent and control CLI.
pub mod ksm;
#[cfg(feature = "policy")]
pub mod policy;
pub mod protocol;

pub use protocol::track_flags;
pub use protocol::{
    decode_frame, page_hash, Advice, DecodeError, FrameReader, Hello, Message, Origin, PageHash,
    ShimStats, Status, MAX_FINGERPRINT_PAGES, MAX_FRAME, MAX_RESIDENCY_RUNS, PROTOCOL_VERSION,
};

use std::io::{self, Read, Write};

/// Reads one whole message from a blocking stream. `Ok(None)` on a clean end of stream.
pub fn read_message(r: &mut impl Read) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; protocol::HEADER_LEN];
    match r.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            DecodeError::Oversized(len),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Message::decode_payload(&payload)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes one message as a frame to a blocking stream.
pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    w.write_all(&m.to_frame())
}

/// The default socket path: `$XDG_RUNTIME_DIR/ksmplus/agent.sock`, else
/// `/run/user/$UID/ksmplus/agent.sock`, else `/tmp/ksmplus-$UID/agent.sock`.
pub fn default_socket_path(xdg_runtime_dir: Option<&str>, uid: u32) -> std::path::PathBuf {
    match xdg_runtime_dir {
        Some(d) if !d.is_empty() => std::path::Path::new(d).join("ksmplus/agent.sock"),
        _ => {
            let run = format!("/run/user/{uid}");
            if std::path::Path::new(&run).is_dir() {
                std::path::Path::new(&run).join("ksmplus/agent.sock")
            } else {
                std::path::PathBuf::from(format!("/tmp/ksmplus-{uid}/agent.sock"))
            }
        }
    }
}
