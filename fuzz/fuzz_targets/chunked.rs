//! The chunked body decoder alone (`transport/src/h1/framing.rs` `poll_decode`, shared by request
//! and response bodies): the input is a body after a `Transfer-Encoding:
//! chunked` head.
//!
//! Beyond "does not crash": the result (data, trailers, bytes left after
//! the body, or the error) is the same whether the bytes come at once or
//! in random pieces; a body that decodes re-encodes canonically (random
//! chunk sizes, the same trailers) to a body that decodes to the same data
//! and trailers with nothing left over.
#![no_main]

use elsinore_fuzz::{Pieces, Rng, decode_body, decode_both_ways, encode_chunked};
use elsinore_transport::fuzzing::h1::BodyFraming;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else {
        return;
    };
    let first = decode_both_ways(BodyFraming::Chunked, body, u64::from(seed));
    if first.outcome.is_err() {
        return;
    }
    let mut rng = Rng::new(u64::from(seed) << 8 | 1);
    let again = encode_chunked(&first.data, first.trailers.as_ref(), &mut rng);
    let second = decode_body(BodyFraming::Chunked, &again, Pieces::AllAtOnce);
    assert_eq!(
        second.outcome,
        Ok(Vec::new()),
        "canonical re-encoding {again:?}"
    );
    assert_eq!(second.data, first.data);
    assert_eq!(second.trailers, first.trailers);
});
