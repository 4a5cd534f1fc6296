//! Property tests: round trips, and hostile input never panics nor over-allocates.
use ksmplus_common::protocol::*;
use proptest::prelude::*;

fn origin() -> impl Strategy<Value = Origin> {
    prop_oneof![Just(Origin::Malloc), Just(Origin::Mmap), Just(Origin::Maps)]
}
fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Ok),
        Just(Status::NotRegistered),
        Just(Status::Invalid),
        any::<i32>().prop_map(Status::Errno),
        Just(Status::Dormant),
    ]
}
fn page_hash_s() -> impl Strategy<Value = PageHash> {
    prop_oneof![
        any::<u64>().prop_map(PageHash::Hash),
        Just(PageHash::NotResident),
        Just(PageHash::Unavailable)
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<[u32; 4]>(), any::<u64>(), "[a-z]{0,15}", ".{0,64}").prop_map(|(a, m, c, e)| {
            Message::Hello(Hello {
                pid: a[0],
                ppid: a[1],
                uid: a[2],
                page_size: a[3],
                min_region: m,
                comm: c,
                exe: e,
            })
        }),
        (any::<[u64; 3]>(), origin()).prop_map(|(a, o)| Message::RegionAdded {
            seq: a[0],
            start: a[1],
            len: a[2],
            origin: o
        }),
        (any::<[u64; 3]>(), origin()).prop_map(|(a, o)| Message::RegionRemoved {
            seq: a[0],
            start: a[1],
            len: a[2],
            origin: o
        }),
        (any::<[u64; 5]>(), origin()).prop_map(|(a, o)| Message::RegionResized {
            seq: a[0],
            origin: o,
            old_start: a[1],
            old_len: a[2],
            new_start: a[3],
            new_len: a[4]
        }),
        any::<u64>().prop_map(|seq| Message::ResyncBegin { seq }),
        any::<[u64; 2]>().prop_map(|a| Message::ResyncEnd {
            seq: a[0],
            regions: a[1]
        }),
        (
            any::<u32>(),
            status(),
            proptest::collection::vec(page_hash_s(), 0..300)
        )
            .prop_map(|(id, status, hashes)| Message::FingerprintReply {
                id,
                status,
                hashes
            }),
        (any::<u32>(), status()).prop_map(|(id, status)| Message::Reply { id, status }),
        (any::<u32>(), any::<[u64; 9]>()).prop_map(|(id, a)| Message::StatsReply {
            id,
            stats: ShimStats {
                regions: a[0],
                region_bytes: a[1],
                events_sent: a[2],
                events_dropped: a[3],
                resyncs: a[4],
                fingerprint_pages: a[5],
                madvise_calls: a[6],
                registry_full: a[7],
                thread_cpu_ns: a[8],
            }
        }),
        any::<u32>().prop_map(|flags| Message::Track { flags }),
        Just(Message::Ignore),
        (
            any::<u32>(),
            proptest::collection::vec(any::<u64>(), 0..300)
        )
            .prop_map(|(id, pages)| Message::Fingerprint { id, pages }),
        (any::<u32>(), any::<[u64; 2]>(), any::<bool>()).prop_map(|(id, a, m)| {
            Message::Madvise {
                id,
                start: a[0],
                len: a[1],
                advice: if m {
                    Advice::Mergeable
                } else {
                    Advice::Unmergeable
                },
            }
        }),
        any::<u32>().prop_map(|id| Message::GetStats { id }),
        (any::<u32>(), any::<[u64; 2]>()).prop_map(|(id, a)| Message::Residency {
            id,
            start: a[0],
            len: a[1]
        }),
        (
            any::<u32>(),
            status(),
            any::<u64>(),
            proptest::collection::vec(any::<(u64, u64)>(), 0..200)
        )
            .prop_map(|(id, status, covered, runs)| Message::ResidencyReply {
                id,
                status,
                covered,
                runs
            }),
        ".{0,200}".prop_map(|json| Message::ControlRequest { json }),
        ".{0,200}".prop_map(|json| Message::ControlReply { json }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip(m in message()) {
        let frame = m.to_frame();
        let (back, used) = decode_frame(&frame).unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, m);
    }

    #[test]
    fn stream_of_frames_split_anywhere(ms in proptest::collection::vec(message(), 1..8), cut in 1usize..64) {
        let mut bytes = Vec::new();
        for m in &ms { m.encode(&mut bytes); }
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(cut) {
            r.push(chunk);
            while let Some(m) = r.next_message().unwrap() { got.push(m); }
        }
        prop_assert_eq!(got, ms);
        prop_assert_eq!(r.pending(), 0);
    }

    #[test]
    fn truncated_frames_are_errors(m in message(), keep in 0.0f64..1.0) {
        let frame = m.to_frame();
        let n = ((frame.len() - 1) as f64 * keep) as usize;
        prop_assert!(decode_frame(&frame[..n]).is_err());
        // A payload cut short (with a consistent length prefix) is an error too.
        if n > 4 {
            let payload = &frame[4..n];
            prop_assert!(Message::decode_payload(payload).is_err());
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_frame(&bytes);
        let _ = Message::decode_payload(&bytes);
        let mut r = FrameReader::new();
        r.push(&bytes);
        while let Ok(Some(_)) = r.next_message() {}
    }

    #[test]
    fn random_payload_with_valid_header_never_panics(t in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
        p.push(t);
        p.extend_from_slice(&body);
        let _ = Message::decode_payload(&p);
    }

    #[test]
    fn corrupted_byte_never_panics(m in message(), pos in any::<prop::sample::Index>(), b in any::<u8>()) {
        let mut frame = m.to_frame();
        let i = pos.index(frame.len());
        frame[i] = b;
        let _ = decode_frame(&frame);
    }
}

#[test]
fn oversized_length_prefix_is_refused_before_buffering() {
    let mut r = FrameReader::new();
    r.push(&(u32::MAX).to_le_bytes());
    assert_eq!(
        r.next_message(),
        Err(DecodeError::Oversized(u32::MAX as usize))
    );
    assert!(matches!(
        decode_frame(&((MAX_FRAME + 1) as u32).to_le_bytes()),
        Err(DecodeError::Oversized(_))
    ));
}

#[test]
fn huge_counts_do_not_allocate() {
    // A Fingerprint claiming 16384 pages but carrying none: refused as truncated, not reserved.
    let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
    p.push(34);
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(&(MAX_FINGERPRINT_PAGES as u32).to_le_bytes());
    assert!(matches!(
        Message::decode_payload(&p),
        Err(DecodeError::Truncated { .. })
    ));
    // One over the limit is refused as too long.
    let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
    p.push(34);
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(&(MAX_FINGERPRINT_PAGES as u32 + 1).to_le_bytes());
    assert!(matches!(
        Message::decode_payload(&p),
        Err(DecodeError::TooLong { .. })
    ));
}

#[test]
fn wrong_version_and_trailing_bytes() {
    let mut f = Message::Ignore.to_frame();
    f[4] = 9;
    assert_eq!(decode_frame(&f).unwrap_err(), DecodeError::Version(9));
    let mut p = Message::Ignore.to_frame()[4..].to_vec();
    p.push(0);
    assert_eq!(
        Message::decode_payload(&p).unwrap_err(),
        DecodeError::Trailing(1)
    );
}

#[test]
fn long_strings_are_cut_to_stay_decodable() {
    let m = Message::Hello(Hello {
        exe: "é".repeat(5000),
        ..Default::default()
    });
    let (back, _) = decode_frame(&m.to_frame()).unwrap();
    match back {
        Message::Hello(h) => assert!(h.exe.len() <= MAX_STR && h.exe.chars().all(|c| c == 'é')),
        _ => unreachable!(),
    }
}
