//! The socket protocol of the agent: a shim's one `Hello` (sent from its constructor, then the
//! shim closes the socket), and `ksmplusctl`'s control requests. Everything after the Hello
//! goes through the channel page ([`crate::channel`]).
//!
//! A frame is `u32` little-endian payload length, then the payload: `u16` protocol version,
//! `u8` message tag, then the message body. Integers are little-endian, strings are `u16`
//! length + UTF-8 bytes (control JSON: `u32` length).
//!
//! Invariants (tested by property tests in `tests/protocol_props.rs`):
//! - `decode(encode(m)) == m` for every message;
//! - decoding never panics, and never allocates more than the frame's own length;
//! - a frame longer than the reader's maximum is refused from its length prefix alone, before
//!   its body is buffered ([`FrameReader`], the one framing implementation: the agent's
//!   server, `ksmplusctl` and the tests all read through it).

use thiserror::Error;

/// Protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest payload any reader accepts (bytes, excluding the 4-byte length prefix).
pub const MAX_FRAME: usize = 1 << 20;
/// Longest string field (comm, exe path).
pub const MAX_STR: usize = 4096;
/// Longest control-channel JSON document.
pub const MAX_JSON: usize = MAX_FRAME - 16;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// A shim's introduction, sent once from its constructor.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Hello {
    /// `getpid()` as the process sees it (the agent trusts `SO_PEERCRED` instead).
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub page_size: u32,
    /// The shim's region threshold in bytes.
    pub min_region: u64,
    /// `/proc/self/comm` (at most 15 bytes on Linux).
    pub comm: String,
    /// `/proc/self/exe` target, or empty when unreadable.
    pub exe: String,
    /// Address of the process's channel page.
    pub channel: u64,
    /// Address of its family doorbell page (0: none).
    pub doorbell: u64,
    /// The channel's nonce: the agent checks it before it writes anything.
    pub nonce: u64,
    /// Bits of [`crate::channel::flag`].
    pub flags: u32,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// ksmplusctl → agent.
    ControlRequest {
        json: String,
    },
    /// agent → ksmplusctl.
    ControlReply {
        json: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized { len: usize, max: usize },
    #[error("frame truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("protocol version {0} not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("{field} has {len} items, more than the limit {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("string field {0} is not UTF-8")]
    BadUtf8(&'static str),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const CONTROL_REQUEST: u8 = 64;
    pub const CONTROL_REPLY: u8 = 65;
}

impl Message {
    /// Appends this message as one complete frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        put_u16(out, PROTOCOL_VERSION);
        match self {
            Message::Hello(h) => {
                out.push(tag::HELLO);
                put_u32(out, h.pid);
                put_u32(out, h.ppid);
                put_u32(out, h.uid);
                put_u32(out, h.page_size);
                put_u64(out, h.min_region);
                put_str(out, &h.comm);
                put_str(out, &h.exe);
                put_u64(out, h.channel);
                put_u64(out, h.doorbell);
                put_u64(out, h.nonce);
                put_u32(out, h.flags);
            }
            Message::ControlRequest { json } => {
                out.push(tag::CONTROL_REQUEST);
                put_long_str(out, json);
            }
            Message::ControlReply { json } => {
                out.push(tag::CONTROL_REPLY);
                put_long_str(out, json);
            }
        }
        let len = (out.len() - at - HEADER_LEN) as u32;
        out[at..at + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    }

    /// Encodes into a fresh buffer.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one payload (a frame without its length prefix).
    pub fn decode_payload(payload: &[u8]) -> Result<Message, DecodeError> {
        if payload.len() > MAX_FRAME {
            return Err(DecodeError::Oversized {
                len: payload.len(),
                max: MAX_FRAME,
            });
        }
        let mut r = Reader { buf: payload };
        let version = r.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::Version(version));
        }
        let msg = match r.u8()? {
            tag::HELLO => Message::Hello(Hello {
                pid: r.u32()?,
                ppid: r.u32()?,
                uid: r.u32()?,
                page_size: r.u32()?,
                min_region: r.u64()?,
                comm: r.str("comm")?,
                exe: r.str("exe")?,
                channel: r.u64()?,
                doorbell: r.u64()?,
                nonce: r.u64()?,
                flags: r.u32()?,
            }),
            tag::CONTROL_REQUEST => Message::ControlRequest {
                json: r.long_str("json")?,
            },
            tag::CONTROL_REPLY => Message::ControlReply {
                json: r.long_str("json")?,
            },
            other => return Err(DecodeError::UnknownTag(other)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Trailing(r.buf.len()));
        }
        Ok(msg)
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
/// Strings longer than [`MAX_STR`] are cut at a char boundary so the frame stays decodable.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s, MAX_STR);
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}
fn put_long_str(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s, MAX_JSON);
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes_str(&mut self, field: &'static str, n: usize) -> Result<String, DecodeError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(field))
    }
    /// `n` bytes of UTF-8, refused without reading them when `n` is over `max`.
    fn bounded_str(
        &mut self,
        field: &'static str,
        n: usize,
        max: usize,
    ) -> Result<String, DecodeError> {
        if n > max {
            return Err(DecodeError::TooLong { field, len: n, max });
        }
        self.bytes_str(field, n)
    }
    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.bounded_str(field, n, MAX_STR)
    }
    fn long_str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        self.bounded_str(field, n, MAX_JSON)
    }
}

/// Splits a byte stream into frames, refusing any frame longer than its maximum from the
/// length prefix alone. Holds at most one frame plus one read's worth of bytes; memory beyond
/// that is given back once the frame is consumed.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new(MAX_FRAME)
    }
}

impl FrameReader {
    /// A reader accepting payloads of at most `max` bytes (capped at [`MAX_FRAME`]).
    pub fn new(max: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            pos: 0,
            max: max.min(MAX_FRAME),
        }
    }

    /// Changes the per-peer maximum (a peer that identified itself may send larger frames).
    pub fn set_max(&mut self, max: usize) {
        self.max = max.min(MAX_FRAME);
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes of memory held by the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. Refuses an oversized
    /// frame as soon as its length prefix is in. After an error the stream is unusable (frame
    /// boundaries are lost): close it.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max {
            return Err(DecodeError::Oversized { len, max: self.max });
        }
        if avail.len() < HEADER_LEN + len {
            self.compact();
            return Ok(None);
        }
        let msg = Message::decode_payload(&avail[HEADER_LEN..HEADER_LEN + len]);
        self.pos += HEADER_LEN + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > 64 * 1024 {
                self.buf = Vec::new();
            }
        }
        msg.map(Some)
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

/// Decodes exactly one frame from the front of `bytes`: `(message, bytes used)`.
pub fn decode_frame(bytes: &[u8]) -> Result<(Message, usize), DecodeError> {
    let mut r = FrameReader::new(MAX_FRAME);
    r.push(bytes);
    match r.next_message()? {
        Some(m) => Ok((m, bytes.len() - r.pending())),
        None => {
            let need = if bytes.len() < HEADER_LEN {
                HEADER_LEN
            } else {
                HEADER_LEN + u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
            };
            Err(DecodeError::Truncated {
                needed: need - bytes.len(),
            })
        }
    }
}

/// Content hash of one page (xxh3-64), as the agent fingerprints pages.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_gives_back_memory_after_a_large_frame() {
        let m = Message::ControlReply {
            json: "x".repeat(300_000),
        };
        let mut r = FrameReader::new(MAX_FRAME);
        let f = m.to_frame();
        for chunk in f.chunks(4096) {
            r.push(chunk);
        }
        assert_eq!(r.next_message().unwrap(), Some(m));
        assert_eq!(r.capacity(), 0, "the frame's buffer is released");
    }

    #[test]
    fn per_peer_maximum_is_enforced_from_the_prefix() {
        let mut r = FrameReader::new(100);
        r.push(&1000u32.to_le_bytes());
        assert_eq!(
            r.next_message(),
            Err(DecodeError::Oversized {
                len: 1000,
                max: 100
            })
        );
    }
}
