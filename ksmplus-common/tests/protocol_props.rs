//! Property tests: round trips, and hostile input never panics nor over-allocates.
use ksmplus_common::protocol::*;
use proptest::prelude::*;

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<[u32; 5]>(),
            any::<[u64; 4]>(),
            "[a-z]{0,15}",
            ".{0,64}"
        )
            .prop_map(|(a, m, c, e)| {
                Message::Hello(Hello {
                    pid: a[0],
                    ppid: a[1],
                    uid: a[2],
                    page_size: a[3],
                    min_region: m[0],
                    comm: c,
                    exe: e,
                    channel: m[1],
                    doorbell: m[2],
                    nonce: m[3],
                    flags: a[4],
                })
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
        let mut r = FrameReader::new(MAX_FRAME);
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
        let mut r = FrameReader::new(MAX_FRAME);
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
    let mut r = FrameReader::new(MAX_FRAME);
    r.push(&(u32::MAX).to_le_bytes());
    assert_eq!(
        r.next_message(),
        Err(DecodeError::Oversized {
            len: u32::MAX as usize,
            max: MAX_FRAME
        })
    );
    assert!(matches!(
        decode_frame(&((MAX_FRAME + 1) as u32).to_le_bytes()),
        Err(DecodeError::Oversized { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Decoding never holds more memory than the frame it was given (plus the reader's own
    /// bounded buffer): a length prefix or a string length that lies is refused, not reserved.
    #[test]
    fn decoding_never_allocates_more_than_the_frame(len in 0u32..u32::MAX, body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
        p.push(64);
        p.extend_from_slice(&len.to_le_bytes());
        p.extend_from_slice(&body);
        match Message::decode_payload(&p) {
            Ok(Message::ControlRequest { json }) => prop_assert!(json.len() <= p.len()),
            Ok(_) => prop_assert!(false, "tag 64 is a ControlRequest"),
            Err(_) => {}
        }
        let mut r = FrameReader::new(1024);
        let mut f = (p.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&p);
        r.push(&f);
        let _ = r.next_message();
        prop_assert!(r.capacity() <= f.len().max(64 * 1024));
    }
}

#[test]
fn wrong_version_and_trailing_bytes() {
    let m = Message::ControlRequest { json: "{}".into() };
    let mut f = m.to_frame();
    f[4] = 9;
    assert_eq!(decode_frame(&f).unwrap_err(), DecodeError::Version(9));
    let mut p = m.to_frame()[4..].to_vec();
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
