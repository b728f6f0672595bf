//! The backend client's response decoder (`transport/src/h1/client.rs`):
//! 1xx interim heads skipped, the final head parsed, then its body read
//! with the framing the head declared (length, chunked, or to the close).
//! The first input byte chooses whether the request was a HEAD.
//!
//! Beyond "does not crash": as for requests, a head parses the same from
//! its own bytes and every prefix is "need more"; a response to HEAD, a
//! 204 and a 304 have no body whatever their fields say; otherwise the
//! framing agrees with Content-Length and Transfer-Encoding (never both;
//! read-to-close only without either); the body decodes the same at once
//! and in pieces.
#![no_main]

use elsinore_fuzz::{decode_both_ways, list_values, parse_u64};
use elsinore_transport::fuzzing::h1::BodyFraming;
use elsinore_transport::fuzzing::h1client::{
    ResponseFraming, ResponseVerdict, parse_response_head,
};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, mut data)) = input.split_first() else {
        return;
    };
    let is_head = seed & 1 == 1;
    // The client skips any number of interim responses.
    let (head, len) = loop {
        match parse_response_head(data, is_head) {
            ResponseVerdict::Interim(len) => {
                assert!(len > 0 && len <= data.len());
                data = &data[len..];
            }
            ResponseVerdict::Final(head, len) => break (head, len),
            ResponseVerdict::Partial | ResponseVerdict::Error(_) => return,
        }
    };
    assert!(len > 0 && len <= data.len());
    match parse_response_head(&data[..len], is_head) {
        ResponseVerdict::Final(again, l) => {
            assert_eq!(l, len);
            assert_eq!(again.framing, head.framing);
            assert_eq!(again.headers, head.headers);
        }
        other => panic!("the head's own {len} bytes give {other:?}"),
    }
    let mut cut = usize::from(seed >> 1) % len;
    for _ in 0..4 {
        match parse_response_head(&data[..cut], is_head) {
            ResponseVerdict::Partial => {}
            other => panic!("prefix of {cut} of a {len}-byte head gives {other:?}"),
        }
        cut = (cut + len) / 2;
    }

    assert!(
        !head.status.is_informational(),
        "final status {}",
        head.status
    );
    let bodiless =
        is_head || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED;
    let lengths = list_values(&head.headers, "content-length");
    let codings = list_values(&head.headers, "transfer-encoding");
    match head.framing {
        ResponseFraming::Framed(BodyFraming::Length(0)) if bodiless => {}
        _ if bodiless => panic!("a bodiless response framed as {:?}", head.framing),
        ResponseFraming::Framed(BodyFraming::Chunked) => {
            assert!(lengths.is_empty(), "chunked with a Content-Length");
            assert!(!codings.is_empty());
        }
        ResponseFraming::Framed(BodyFraming::Length(n)) => {
            assert!(codings.is_empty(), "length-framed with a Transfer-Encoding");
            assert!(!lengths.is_empty(), "length {n} with no Content-Length");
            assert!(lengths.iter().all(|l| parse_u64(l) == Some(n)));
        }
        ResponseFraming::Close => {
            assert!(lengths.is_empty() && codings.is_empty());
        }
    }
    if let ResponseFraming::Framed(framing) = head.framing {
        decode_both_ways(framing, &data[len..], u64::from(seed));
    }
});
