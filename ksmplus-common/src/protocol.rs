//! The wire protocol between the shim (`libksmplus.so`), the agent and `ksmplusctl`.
//!
//! A frame is `u32` little-endian payload length, then the payload:
//! `u16` protocol version, `u8` message tag, then the message body. Integers are
//! little-endian, strings are `u16` length + UTF-8 bytes, lists are `u32` count + items.
//!
//! Invariants (tested by property tests in `tests/protocol_props.rs`):
//! - `decode(encode(m)) == m` for every message;
//! - decoding never panics, and never allocates more than the frame's own length:
//!   every count is checked against the bytes that remain before anything is reserved;
//! - a frame longer than [`MAX_FRAME`] is refused from its length prefix alone,
//!   before its body is buffered.

use thiserror::Error;

/// Protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest payload accepted (bytes, excluding the 4-byte length prefix).
pub const MAX_FRAME: usize = 1 << 20;
/// Most page addresses in one `Fingerprint` command (and hashes in its reply).
pub const MAX_FINGERPRINT_PAGES: usize = 16 * 1024;
/// Most resident runs in one `ResidencyReply`.
pub const MAX_RESIDENCY_RUNS: usize = 16 * 1024;
/// Longest string field (comm, exe path, control JSON is separate).
pub const MAX_STR: usize = 4096;
/// Longest control-channel JSON document.
pub const MAX_JSON: usize = MAX_FRAME - 16;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Where a region came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// malloc, calloc, realloc, posix_memalign and the memalign family (shim-owned mapping).
    Malloc = 0,
    /// A private anonymous `mmap` made by the program.
    Mmap = 1,
    /// Discovered from `/proc/self/maps` (heap, arenas, other anonymous mappings).
    Maps = 2,
}

/// What a `Madvise` command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    Mergeable = 0,
    Unmergeable = 1,
}

/// Outcome of a command, carried by replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// The address range is not inside one live registered region.
    NotRegistered,
    /// Malformed request (unaligned, empty, too many pages).
    Invalid,
    /// The system call failed with this errno.
    Errno(i32),
    /// The shim is dormant and obeys no command.
    Dormant,
}

/// Result for one page of a `Fingerprint` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageHash {
    /// 64-bit content hash (xxh3) of the resident page.
    Hash(u64),
    /// The page is not resident; it was not read (and so not faulted in).
    NotResident,
    /// The page is outside every registered region, or could not be read.
    Unavailable,
}

/// The first message of a shim connection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Hello {
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
}

/// Counters the shim keeps about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShimStats {
    pub regions: u64,
    pub region_bytes: u64,
    pub events_sent: u64,
    pub events_dropped: u64,
    pub resyncs: u64,
    pub fingerprint_pages: u64,
    pub madvise_calls: u64,
    pub registry_full: u64,
    /// CPU time of the shim's client thread, nanoseconds.
    pub thread_cpu_ns: u64,
}

/// Flags of a `Track` command.
pub mod track_flags {
    /// Mark every region MERGEABLE as soon as it is registered (the "madvise-all" mode).
    pub const MADVISE_ALL: u32 = 1;
    /// Also register the process's other private anonymous writable mappings, found in
    /// `/proc/self/maps` (heap, glibc arenas, toolkit allocators), with origin `Maps`.
    pub const COVER_MAPS: u32 = 2;
}

/// Every message of the protocol, in both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // shim -> agent
    Hello(Hello),
    RegionAdded {
        seq: u64,
        start: u64,
        len: u64,
        origin: Origin,
    },
    RegionRemoved {
        seq: u64,
        start: u64,
        len: u64,
        origin: Origin,
    },
    RegionResized {
        seq: u64,
        origin: Origin,
        old_start: u64,
        old_len: u64,
        new_start: u64,
        new_len: u64,
    },
    /// The shim is about to resend its whole registry; the agent drops its view of this client.
    ResyncBegin {
        seq: u64,
    },
    /// End of a resync; `regions` RegionAdded messages were sent since `ResyncBegin`.
    ResyncEnd {
        seq: u64,
        regions: u64,
    },
    FingerprintReply {
        id: u32,
        status: Status,
        hashes: Vec<PageHash>,
    },
    /// Reply to `Madvise`.
    Reply {
        id: u32,
        status: Status,
    },
    StatsReply {
        id: u32,
        stats: ShimStats,
    },
    /// Reply to `Residency`: the resident page runs `(start, len)` (bytes, page-aligned, in
    /// address order) found in the first `covered` bytes of the asked range. `covered` is less
    /// than asked when `MAX_RESIDENCY_RUNS` runs were found first: ask again from there.
    ResidencyReply {
        id: u32,
        status: Status,
        covered: u64,
        runs: Vec<(u64, u64)>,
    },
    // agent -> shim
    Track {
        flags: u32,
    },
    Ignore,
    Fingerprint {
        id: u32,
        pages: Vec<u64>,
    },
    Madvise {
        id: u32,
        start: u64,
        len: u64,
        advice: Advice,
    },
    GetStats {
        id: u32,
    },
    /// Which pages of `[start, start+len)` (inside one registered region) are resident, from
    /// `mincore`: lets the agent sample only memory that exists.
    Residency {
        id: u32,
        start: u64,
        len: u64,
    },
    // ksmplusctl <-> agent
    ControlRequest {
        json: String,
    },
    ControlReply {
        json: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME}")]
    Oversized(usize),
    #[error("frame truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("protocol version {0} not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("invalid value {value} for field {field}")]
    BadValue { field: &'static str, value: u64 },
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
    pub const REGION_ADDED: u8 = 2;
    pub const REGION_REMOVED: u8 = 3;
    pub const REGION_RESIZED: u8 = 4;
    pub const RESYNC_BEGIN: u8 = 5;
    pub const RESYNC_END: u8 = 6;
    pub const FINGERPRINT_REPLY: u8 = 7;
    pub const REPLY: u8 = 8;
    pub const STATS_REPLY: u8 = 9;
    pub const RESIDENCY_REPLY: u8 = 10;
    pub const TRACK: u8 = 32;
    pub const IGNORE: u8 = 33;
    pub const FINGERPRINT: u8 = 34;
    pub const MADVISE: u8 = 35;
    pub const GET_STATS: u8 = 36;
    pub const RESIDENCY: u8 = 37;
    pub const CONTROL_REQUEST: u8 = 64;
    pub const CONTROL_REPLY: u8 = 65;
}

impl Message {
    /// True for messages a shim sends (and an agent accepts from a shim).
    pub fn is_from_shim(&self) -> bool {
        matches!(
            self,
            Message::Hello(_)
                | Message::RegionAdded { .. }
                | Message::RegionRemoved { .. }
                | Message::RegionResized { .. }
                | Message::ResyncBegin { .. }
                | Message::ResyncEnd { .. }
                | Message::FingerprintReply { .. }
                | Message::Reply { .. }
                | Message::StatsReply { .. }
                | Message::ResidencyReply { .. }
        )
    }

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
            }
            Message::RegionAdded {
                seq,
                start,
                len,
                origin,
            } => {
                out.push(tag::REGION_ADDED);
                put_u64(out, *seq);
                put_u64(out, *start);
                put_u64(out, *len);
                out.push(*origin as u8);
            }
            Message::RegionRemoved {
                seq,
                start,
                len,
                origin,
            } => {
                out.push(tag::REGION_REMOVED);
                put_u64(out, *seq);
                put_u64(out, *start);
                put_u64(out, *len);
                out.push(*origin as u8);
            }
            Message::RegionResized {
                seq,
                origin,
                old_start,
                old_len,
                new_start,
                new_len,
            } => {
                out.push(tag::REGION_RESIZED);
                put_u64(out, *seq);
                out.push(*origin as u8);
                put_u64(out, *old_start);
                put_u64(out, *old_len);
                put_u64(out, *new_start);
                put_u64(out, *new_len);
            }
            Message::ResyncBegin { seq } => {
                out.push(tag::RESYNC_BEGIN);
                put_u64(out, *seq);
            }
            Message::ResyncEnd { seq, regions } => {
                out.push(tag::RESYNC_END);
                put_u64(out, *seq);
                put_u64(out, *regions);
            }
            Message::FingerprintReply { id, status, hashes } => {
                out.push(tag::FINGERPRINT_REPLY);
                put_u32(out, *id);
                put_status(out, *status);
                put_u32(out, hashes.len() as u32);
                for h in hashes {
                    match h {
                        PageHash::Hash(v) => {
                            out.push(0);
                            put_u64(out, *v);
                        }
                        PageHash::NotResident => out.push(1),
                        PageHash::Unavailable => out.push(2),
                    }
                }
            }
            Message::Reply { id, status } => {
                out.push(tag::REPLY);
                put_u32(out, *id);
                put_status(out, *status);
            }
            Message::StatsReply { id, stats } => {
                out.push(tag::STATS_REPLY);
                put_u32(out, *id);
                for v in [
                    stats.regions,
                    stats.region_bytes,
                    stats.events_sent,
                    stats.events_dropped,
                    stats.resyncs,
                    stats.fingerprint_pages,
                    stats.madvise_calls,
                    stats.registry_full,
                    stats.thread_cpu_ns,
                ] {
                    put_u64(out, v);
                }
            }
            Message::ResidencyReply {
                id,
                status,
                covered,
                runs,
            } => {
                out.push(tag::RESIDENCY_REPLY);
                put_u32(out, *id);
                put_status(out, *status);
                put_u64(out, *covered);
                put_u32(out, runs.len() as u32);
                for (s, l) in runs {
                    put_u64(out, *s);
                    put_u64(out, *l);
                }
            }
            Message::Residency { id, start, len } => {
                out.push(tag::RESIDENCY);
                put_u32(out, *id);
                put_u64(out, *start);
                put_u64(out, *len);
            }
            Message::Track { flags } => {
                out.push(tag::TRACK);
                put_u32(out, *flags);
            }
            Message::Ignore => out.push(tag::IGNORE),
            Message::Fingerprint { id, pages } => {
                out.push(tag::FINGERPRINT);
                put_u32(out, *id);
                put_u32(out, pages.len() as u32);
                for p in pages {
                    put_u64(out, *p);
                }
            }
            Message::Madvise {
                id,
                start,
                len,
                advice,
            } => {
                out.push(tag::MADVISE);
                put_u32(out, *id);
                put_u64(out, *start);
                put_u64(out, *len);
                out.push(*advice as u8);
            }
            Message::GetStats { id } => {
                out.push(tag::GET_STATS);
                put_u32(out, *id);
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
            return Err(DecodeError::Oversized(payload.len()));
        }
        let mut r = Reader { buf: payload };
        let version = r.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::Version(version));
        }
        let t = r.u8()?;
        let msg = match t {
            tag::HELLO => Message::Hello(Hello {
                pid: r.u32()?,
                ppid: r.u32()?,
                uid: r.u32()?,
                page_size: r.u32()?,
                min_region: r.u64()?,
                comm: r.str("comm")?,
                exe: r.str("exe")?,
            }),
            tag::REGION_ADDED => Message::RegionAdded {
                seq: r.u64()?,
                start: r.u64()?,
                len: r.u64()?,
                origin: r.origin()?,
            },
            tag::REGION_REMOVED => Message::RegionRemoved {
                seq: r.u64()?,
                start: r.u64()?,
                len: r.u64()?,
                origin: r.origin()?,
            },
            tag::REGION_RESIZED => Message::RegionResized {
                seq: r.u64()?,
                origin: r.origin()?,
                old_start: r.u64()?,
                old_len: r.u64()?,
                new_start: r.u64()?,
                new_len: r.u64()?,
            },
            tag::RESYNC_BEGIN => Message::ResyncBegin { seq: r.u64()? },
            tag::RESYNC_END => Message::ResyncEnd {
                seq: r.u64()?,
                regions: r.u64()?,
            },
            tag::FINGERPRINT_REPLY => {
                let id = r.u32()?;
                let status = r.status()?;
                // Each hash takes at least one byte.
                let n = r.count("hashes", MAX_FINGERPRINT_PAGES, 1)?;
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(match r.u8()? {
                        0 => PageHash::Hash(r.u64()?),
                        1 => PageHash::NotResident,
                        2 => PageHash::Unavailable,
                        v => {
                            return Err(DecodeError::BadValue {
                                field: "page hash kind",
                                value: v as u64,
                            })
                        }
                    });
                }
                Message::FingerprintReply { id, status, hashes }
            }
            tag::REPLY => Message::Reply {
                id: r.u32()?,
                status: r.status()?,
            },
            tag::STATS_REPLY => Message::StatsReply {
                id: r.u32()?,
                stats: ShimStats {
                    regions: r.u64()?,
                    region_bytes: r.u64()?,
                    events_sent: r.u64()?,
                    events_dropped: r.u64()?,
                    resyncs: r.u64()?,
                    fingerprint_pages: r.u64()?,
                    madvise_calls: r.u64()?,
                    registry_full: r.u64()?,
                    thread_cpu_ns: r.u64()?,
                },
            },
            tag::RESIDENCY_REPLY => {
                let id = r.u32()?;
                let status = r.status()?;
                let covered = r.u64()?;
                let n = r.count("runs", MAX_RESIDENCY_RUNS, 16)?;
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    runs.push((r.u64()?, r.u64()?));
                }
                Message::ResidencyReply {
                    id,
                    status,
                    covered,
                    runs,
                }
            }
            tag::RESIDENCY => Message::Residency {
                id: r.u32()?,
                start: r.u64()?,
                len: r.u64()?,
            },
            tag::TRACK => Message::Track { flags: r.u32()? },
            tag::IGNORE => Message::Ignore,
            tag::FINGERPRINT => {
                let id = r.u32()?;
                let n = r.count("pages", MAX_FINGERPRINT_PAGES, 8)?;
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push(r.u64()?);
                }
                Message::Fingerprint { id, pages }
            }
            tag::MADVISE => Message::Madvise {
                id: r.u32()?,
                start: r.u64()?,
                len: r.u64()?,
                advice: match r.u8()? {
                    0 => Advice::Mergeable,
                    1 => Advice::Unmergeable,
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "advice",
                            value: v as u64,
                        })
                    }
                },
            },
            tag::GET_STATS => Message::GetStats { id: r.u32()? },
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
fn put_status(out: &mut Vec<u8>, s: Status) {
    match s {
        Status::Ok => out.push(0),
        Status::NotRegistered => out.push(1),
        Status::Invalid => out.push(2),
        Status::Errno(e) => {
            out.push(3);
            out.extend_from_slice(&e.to_le_bytes());
        }
        Status::Dormant => out.push(4),
    }
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
    /// A list count, checked against `max` and against the bytes left
    /// (each item needs at least `min_item` bytes) before anything is allocated.
    fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::TooLong { field, len: n, max });
        }
        let need = n * min_item;
        if need > self.buf.len() {
            return Err(DecodeError::Truncated {
                needed: need - self.buf.len(),
            });
        }
        Ok(n)
    }
    fn bytes_str(&mut self, field: &'static str, n: usize) -> Result<String, DecodeError> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(field))
    }
    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(DecodeError::TooLong {
                field,
                len: n,
                max: MAX_STR,
            });
        }
        self.bytes_str(field, n)
    }
    fn long_str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_JSON {
            return Err(DecodeError::TooLong {
                field,
                len: n,
                max: MAX_JSON,
            });
        }
        self.bytes_str(field, n)
    }
    fn origin(&mut self) -> Result<Origin, DecodeError> {
        match self.u8()? {
            0 => Ok(Origin::Malloc),
            1 => Ok(Origin::Mmap),
            2 => Ok(Origin::Maps),
            v => Err(DecodeError::BadValue {
                field: "origin",
                value: v as u64,
            }),
        }
    }
    fn status(&mut self) -> Result<Status, DecodeError> {
        match self.u8()? {
            0 => Ok(Status::Ok),
            1 => Ok(Status::NotRegistered),
            2 => Ok(Status::Invalid),
            3 => Ok(Status::Errno(i32::from_le_bytes(self.array()?))),
            4 => Ok(Status::Dormant),
            v => Err(DecodeError::BadValue {
                field: "status",
                value: v as u64,
            }),
        }
    }
}

/// Splits a byte stream into frames. Holds at most one frame plus one read's worth of bytes.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
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

    /// The next complete message, `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable (frame boundaries are lost): close it.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::Oversized(len));
        }
        if avail.len() < HEADER_LEN + len {
            self.compact();
            return Ok(None);
        }
        let msg = Message::decode_payload(&avail[HEADER_LEN..HEADER_LEN + len]);
        self.pos += HEADER_LEN + len;
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
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN - bytes.len(),
        });
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::Oversized(len));
    }
    if bytes.len() < HEADER_LEN + len {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN + len - bytes.len(),
        });
    }
    let m = Message::decode_payload(&bytes[HEADER_LEN..HEADER_LEN + len])?;
    Ok((m, HEADER_LEN + len))
}

/// Content hash of one page, as used on the wire (xxh3-64).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}
