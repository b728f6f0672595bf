//! The HTTP/1.1 server's request decoder (`transport/src/h1/server.rs`): the
//! head parser, then the body decoder with the framing the head declared.
//!
//! Beyond "does not crash": a complete head parses the same from exactly
//! its own bytes, and every shorter prefix of it is "need more" (the server
//! parses again each time bytes arrive, so a prefix refused would make the
//! verdict depend on TCP segmentation); the declared framing agrees with the
//! Content-Length and Transfer-Encoding fields (never both, a chunked body
//! carries no Content-Length, a length equals every Content-Length value);
//! framing fields are not forwarded; the body decodes the same whether its
//! bytes come at once or in random pieces, and a length-framed body has
//! exactly its length.
#![no_main]

use elsinore_fuzz::{decode_both_ways, list_values, parse_u64};
use elsinore_transport::fuzzing::h1::{BodyFraming, HeadVerdict, parse_request_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let verdict = parse_request_head(data);
    let HeadVerdict::Complete(head, len) = verdict else {
        return;
    };
    assert!(
        len > 0 && len <= data.len(),
        "head length {len} of {}",
        data.len()
    );

    // The same head from exactly its bytes; "need more" from every prefix.
    match parse_request_head(&data[..len]) {
        HeadVerdict::Complete(again, l) => {
            assert_eq!(l, len);
            assert_eq!(again.headers, head.headers);
            assert_eq!(again.framing, head.framing);
            assert_eq!(again.uri, head.uri);
        }
        other => panic!("the head's own {len} bytes give {other:?}"),
    }
    let mut cut = usize::from(seed) % len;
    for _ in 0..4 {
        match parse_request_head(&data[..cut]) {
            HeadVerdict::Partial => {}
            other => panic!("prefix of {cut} of a {len}-byte head gives {other:?}"),
        }
        cut = (cut + len) / 2;
    }

    assert_ne!(head.method, http::Method::CONNECT, "CONNECT is refused");
    assert!(!head.headers.contains_key(http::header::TRANSFER_ENCODING));
    assert!(!head.headers.contains_key(http::header::EXPECT));
    let lengths = list_values(&head.headers, "content-length");
    match head.framing {
        BodyFraming::Chunked => {
            assert!(
                lengths.is_empty(),
                "a chunked request with a Content-Length"
            );
        }
        BodyFraming::Length(n) => {
            assert!(
                lengths.iter().all(|l| parse_u64(l) == Some(n)),
                "length {n} but Content-Length {lengths:?}"
            );
            if lengths.is_empty() {
                assert_eq!(n, 0, "a body length with no Content-Length");
            }
        }
    }
    decode_both_ways(head.framing, &data[len..], u64::from(seed));
});
