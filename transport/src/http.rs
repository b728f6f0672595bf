//! HTTP rules every proxy loop shares, whatever the version: THE list of
//! hop-by-hop fields and the one function that strips them. Egress
//! (local app → peer, over HTTP/2) and ingress (peer → backend) strip a
//! message's hop with it; the HTTP/1.1 server writes none of them in a
//! response head. Also the one error type a body crossing the HTTP/1.1
//! and HTTP/2 loops may fail with, and the two shapes those loops are
//! generic over: the body they send and the handler a server calls.

use std::future::Future;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body;

/// What a body crossing these loops may fail with (hyper's body error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body these loops can send: chunks of [`Bytes`], and an error that
/// boxes into [`BoxError`]. Every such body is one.
pub trait BytesBody: Body<Data = Bytes, Error: Into<BoxError>> {}

impl<B: Body<Data = Bytes, Error: Into<BoxError>> + ?Sized> BytesBody for B {}

/// What a server calls for each request: an async function from the
/// request to its response, called as a closure. Every closure of that
/// shape is one, and a closure passed where a `Handler` is wanted gets its
/// argument type from the `Fn` supertrait. The servers are generic over it
/// (no box, no `dyn`), so a handler is compiled into the loop that calls it.
pub trait Handler<ReqBody>: Fn(Request<ReqBody>) -> <Self as Handler<ReqBody>>::Future {
    type Body: BytesBody;
    type Future: Future<Output = Response<Self::Body>>;
}

impl<ReqBody, F, Fut, B> Handler<ReqBody> for F
where
    F: Fn(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: BytesBody,
{
    type Body = B;
    type Future = Fut;
}

/// The fields that describe one hop's connection, not the message (RFC
/// 9110 §7.6.1, with the legacy `keep-alive` and `proxy-connection`): no
/// proxy forwards them, and a `Connection` field names more. `te` is one,
/// but may go on as `te: trailers` ([`Te`]).
pub static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// The proxy authentication fields (RFC 9110 §11.7): for the proxy the
/// sender talks to, which egress is to a local app; stripped there
/// ([`Strip::proxy_auth`]).
pub static PROXY_AUTH: [HeaderName; 2] = [header::PROXY_AUTHENTICATE, header::PROXY_AUTHORIZATION];

/// Which `te` survives the strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Te {
    /// The `te` fields stay if each is exactly `trailers` and all go
    /// otherwise: what HTTP/2 allows (RFC 9113 §8.2.2), as egress sends.
    Exact,
    /// `te: trailers` when any element of the `te` fields is `trailers`
    /// (any case), none otherwise: what ingress passes on to a backend.
    Trailers,
}

/// Where the two directions strip differently.
#[derive(Debug, Clone, Copy)]
pub struct Strip<'a> {
    /// Strip [`PROXY_AUTH`] too.
    pub proxy_auth: bool,
    pub te: Te,
    /// Fields a `Connection` token must not remove: ones the caller adds
    /// itself.
    pub keep: &'a [&'a str],
}

/// Whether `name` is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Removes the fields that describe one hop, not the message: those named
/// in `Connection` (but `how.keep`), [`HOP_BY_HOP`] (with [`PROXY_AUTH`]
/// when `how.proxy_auth`), and `te` as `how.te` says. Most messages carry
/// none of them, and one scan of their fields finds that first.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, how: &Strip<'_>) {
    let listed = |n: &HeaderName| is_hop_by_hop(n) || (how.proxy_auth && PROXY_AUTH.contains(n));
    if !headers.keys().any(listed) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !how.keep.contains(&name.as_str()) {
                headers.remove(name);
            }
        }
    }
    for name in HOP_BY_HOP.iter().filter(|n| **n != header::TE) {
        headers.remove(name);
    }
    if how.proxy_auth {
        for name in &PROXY_AUTH {
            headers.remove(name);
        }
    }
    match how.te {
        Te::Exact => {
            // Every field, not the first: `te: trailers` followed by
            // `te: gzip` is not what HTTP/2 allows either.
            if headers
                .get_all(header::TE)
                .iter()
                .any(|v| v.as_bytes() != b"trailers")
            {
                headers.remove(header::TE);
            }
        }
        Te::Trailers => {
            if headers.contains_key(header::TE) {
                let trailers = headers
                    .get_all(header::TE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
                headers.remove(header::TE);
                if trailers {
                    headers.insert(header::TE, HeaderValue::from_static("trailers"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(te: Te, values: &[&'static str]) -> Vec<String> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::TE, HeaderValue::from_static(v));
        }
        let how = Strip {
            proxy_auth: false,
            te,
            keep: &[],
        };
        strip_hop_by_hop(&mut headers, &how);
        headers
            .get_all(header::TE)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .collect()
    }

    #[test]
    fn exact_te_keeps_only_fields_that_are_all_trailers() {
        assert_eq!(strip(Te::Exact, &["trailers"]), ["trailers"]);
        assert_eq!(
            strip(Te::Exact, &["trailers", "trailers"]),
            ["trailers", "trailers"]
        );
        assert!(strip(Te::Exact, &["gzip"]).is_empty());
        assert!(
            strip(Te::Exact, &["trailers", "gzip"]).is_empty(),
            "a second field counts"
        );
        assert!(strip(Te::Exact, &["gzip", "trailers"]).is_empty());
        assert!(strip(Te::Exact, &["trailers, gzip"]).is_empty());
    }

    #[test]
    fn trailers_te_becomes_one_trailers_field_if_any_element_asks() {
        assert_eq!(strip(Te::Trailers, &["gzip", "Trailers"]), ["trailers"]);
        assert_eq!(strip(Te::Trailers, &["gzip, trailers"]), ["trailers"]);
        assert!(strip(Te::Trailers, &["gzip"]).is_empty());
    }
}
