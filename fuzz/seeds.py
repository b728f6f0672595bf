#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/: a few valid inputs
per target (and a few classic hostile shapes), small, deterministic, so
they can be committed and regenerated. Run from anywhere:
python3 fuzz/seeds.py. The first byte of most inputs is the target's
control byte (see each target's doc comment)."""

import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- HTTP/1.1 requests (first byte: seed for cut points and piece sizes)
REQUESTS = {
    "get": "GET /index.html HTTP/1.1\r\nHost: svc.a.example\r\nAccept: */*\r\n\r\n",
    "get10_keepalive": "GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    "post_length": "POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    "post_chunked": "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
    "expect_continue": "PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "pipelined": "GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    "cl_te": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl_list": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "te_gzip": "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "absolute_form": "GET http://svc.a.example:8080/x?y=1 HTTP/1.1\r\nHost: svc.a.example:8080\r\n\r\n",
    "userinfo_host": "GET / HTTP/1.1\r\nHost: user@svc.a.example\r\n\r\n",
    "http10_te": "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
}
for name, text in REQUESTS.items():
    put("h1_request", name, b"\x07" + text.encode())

# ---- HTTP/1.1 responses (first byte: bit 0 = the request was HEAD)
RESPONSES = {
    "ok_length": (0, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"),
    "ok_chunked": (0, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "4\r\nwiki\r\n5\r\npedia\r\n0\r\ngrpc-status: 0\r\n\r\n"),
    "ok_close": (0, "HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\n\r\nbody until close"),
    "continue_then_ok": (0, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
    "no_content": (0, "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
    "not_modified": (0, "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
    "head_response": (1, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    "conflicting_lengths": (0, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    "switching": (0, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
}
for name, (flag, text) in RESPONSES.items():
    put("h1_response", name, bytes([flag]) + text.encode())

# ---- chunked bodies alone (first byte: seed)
CHUNKED = {
    "simple": "5\r\nhello\r\n0\r\n\r\n",
    "two_chunks_trailers": "3\r\nabc\r\na\r\n0123456789\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n",
    "extensions": "4;name=value;q=\"x\"\r\ntest\r\n0;last\r\n\r\n",
    "upper_hex": "1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
    "leftover": "1\r\nx\r\n0\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
    "empty": "0\r\n\r\n",
}
for name, text in CHUNKED.items():
    put("chunked", name, b"\x05" + text.encode())


# ---- Hamlet protobufs
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def entry(k, v):
    return field(1, k) + field(2, v)


V2 = (
    field(1, "reviews")
    + field(2, "the reviews service")
    + field(3, "team-a")
    + field(4, entry("tier", "gold"))
    + field(5, "Reviews.Default.Global.")
    + field(9, field(1, "10.0.0.1") + field(2, 15443) + field(3, "zone-a"))
    + field(9, field(1, "gw.b.example") + field(2, 15443))
    + field(10, "spiffe://b.example/ns/elsinore/sa/gateway")
    + field(11, field(1, "http") + field(2, "HTTP") + field(3, entry("PORT", "9080"))
            + field(4, "zone-a"))
    + field(11, field(1, "grpc") + field(2, "GRPC") + field(3, entry("SNI", "grpc.reviews.example")))
)
V1 = (
    field(1, "ratings")
    + field(5, "ratings.bookinfo.global")
    + field(6, "ratings-id")
    + field(7, "spiffe://b.example/gw")
    + field(8, "HTTP")
    + field(8, "http")
    + field(8, "TCP")
    + field(9, field(1, "192.0.2.7") + field(2, 443))
)
TYPE_V2 = "type.googleapis.com/federation.types.v1alpha2.FederatedService"
TYPE_V1 = "type.googleapis.com/federation.types.v1alpha1.FederatedService"


def any_(url, value):
    return field(1, url) + field(2, value)


put("hamlet", "v2_service", b"\x00" + V2)
put("hamlet", "v1_service", b"\x01" + V1)
put("hamlet", "v2_service_minimal",
    b"\x00" + field(1, "a") + field(5, "a.global") + field(9, field(1, "h") + field(2, 1))
    + field(10, "s") + field(11, field(1, "i") + field(2, "tcp")))
# rd2 BidirectionalStream{response: StreamResponse{nonce, url, resource_id, resource, op}}
rd2_upsert = field(1, "n-1") + field(2, TYPE_V2) + field(3, "reviews") + field(4, any_(TYPE_V2, V2)) + field(5, 1)
put("hamlet", "rd2_upsert", b"\x02" + field(2, rd2_upsert))
put("hamlet", "rd2_upsert_wrong_id", b"\x02" + field(2, field(1, "n-2") + field(3, "other") + field(4, any_(TYPE_V2, V2)) + field(5, 1)))
put("hamlet", "rd2_delete", b"\x02" + field(2, field(1, "n-3") + field(3, "reviews") + field(5, 2)))
put("hamlet", "rd2_request_only", b"\x02" + field(1, field(1, TYPE_V2) + field(2, "n-1")))
# rd1 StreamResponse{nonce, url, resource, op}
put("hamlet", "rd1_create", b"\x03" + field(1, "n-1") + field(2, TYPE_V1) + field(3, any_(TYPE_V1, V1)) + field(4, 1))
put("hamlet", "rd1_delete", b"\x03" + field(1, "n-2") + field(3, any_(TYPE_V1, field(1, "ratings"))) + field(4, 3))
put("hamlet", "rd1_wrong_type", b"\x03" + field(1, "n-3") + field(3, any_(TYPE_V2, V2)) + field(4, 2))


# ---- DNS queries (first byte: bit 0 = TCP)
def dns_name(name):
    out = b""
    for label in name.split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(qid, name, qtype=1, qclass=1, edns=None, flags=0x0100, qdcount=1):
    arcount = 1 if edns is not None else 0
    msg = struct.pack(">HHHHHH", qid, flags, qdcount, 0, 0, arcount)
    msg += dns_name(name) + struct.pack(">HH", qtype, qclass)
    if edns is not None:
        payload, version = edns
        msg += b"\x00" + struct.pack(">HHBBHH", 41, payload, 0, version, 0, 0)
    return msg


put("dns_query", "a_reviews", b"\x00" + query(0x1234, "reviews.default.global"))
put("dns_query", "a_mixed_case_edns", b"\x00" + query(0x0001, "ReViEwS.dEfAuLt.GlObAl", edns=(4096, 0)))
put("dns_query", "aaaa_ratings", b"\x00" + query(0x0002, "ratings.bookinfo.svc.cluster.local", qtype=28))
put("dns_query", "soa_apex", b"\x01" + query(0x0003, "global", qtype=6))
put("dns_query", "nxdomain", b"\x00" + query(0x0004, "nope.default.global"))
put("dns_query", "ent", b"\x00" + query(0x0005, "a.b.c.global"))
put("dns_query", "refused", b"\x00" + query(0x0006, "example.com"))
put("dns_query", "badvers", b"\x00" + query(0x0007, "reviews.default.global", edns=(1232, 1)))
put("dns_query", "chaos", b"\x00" + query(0x0008, "version.bind", qtype=16, qclass=3))
put("dns_query", "any_tcp", b"\x01" + query(0x0009, "db.a.b.c.global", qtype=255))
put("dns_query", "header_only", b"\x00" + struct.pack(">HHHHHH", 0x000a, 0x0100, 1, 0, 0, 0))

# ---- config (YAML as `elsinore check` reads it)
with open(os.path.join(os.path.dirname(ROOT), "..", "deploy", "examples", "mesh-a.yaml"), "rb") as f:
    put("config", "mesh_a", f.read())
with open(os.path.join(os.path.dirname(ROOT), "..", "deploy", "examples", "mesh-b.yaml"), "rb") as f:
    put("config", "mesh_b", f.read())
put("config", "anchors", "a: &x [1, 2]\nb: *x\nmesh: {name: m}\n")
put("config", "empty", "")

# ---- ClientHellos (OpenSSL's, through Python's ssl module with memory BIOs)
import ssl


def client_hello(sni, alpn=None, min_v=None, max_v=None, ciphers=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if min_v:
        ctx.minimum_version = min_v
    if max_v:
        ctx.maximum_version = max_v
    if ciphers:
        ctx.set_ciphers(ciphers)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# Session IDs and key shares are random: regenerating changes these bytes,
# not their shape.
put("client_hello", "tls13_sni_h2", client_hello("svc.a.example", ["h2", "http/1.1"]))
put("client_hello", "tls13_no_sni", client_hello(None, ["h2"]))
put("client_hello", "tls12_only", client_hello("svc.a.example", ["http/1.1"],
                                               max_v=ssl.TLSVersion.TLSv1_2,
                                               ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
put("client_hello", "other_sni", client_hello("elsewhere.example"))

# ---- records sealed under the real key (see tls_records.rs for the format)
def rec(ty, content, pad=0, corrupt=False):
    return bytes([2 if corrupt else 0, ty, pad]) + struct.pack(">H", len(content)) + content


def raw(data):
    return bytes([1, len(data)]) + data


def key_update(requested):
    return bytes([3, requested])


for suite in range(3):
    put("tls_records", f"data_{suite}", bytes([suite]) + rec(23, b"GET / HTTP/1.1\r\n\r\n") + rec(23, b"x" * 100, pad=20))
put("tls_records", "key_update_requested", b"\x00" + rec(23, b"before") + key_update(1) + rec(23, b"after"))
put("tls_records", "key_update_sealed", b"\x01" + rec(22, bytes([24, 0, 0, 1, 0])) + rec(23, b"after"))
put("tls_records", "close_notify", b"\x02" + rec(23, b"bye") + rec(21, bytes([1, 0])))
put("tls_records", "user_canceled", b"\x00" + rec(21, bytes([1, 90])) + rec(23, b"more"))
put("tls_records", "empty_records", b"\x00" + rec(23, b"") * 5 + rec(23, b"x"))
put("tls_records", "only_padding", b"\x00" + rec(23, b"", pad=200))
put("tls_records", "new_session_ticket", b"\x00" + rec(22, bytes([4, 0, 0, 9]) + bytes(9)) + rec(23, b"x"))
put("tls_records", "handshake_fragment", b"\x00" + rec(22, bytes([24, 0])) + rec(23, b"between") + rec(22, bytes([0, 1, 0])))
put("tls_records", "corrupt_tag", b"\x00" + rec(23, b"ok") + rec(23, b"tampered", corrupt=True))
put("tls_records", "overflow", b"\x00" + rec(23, b"y" * (16 * 1024 + 1)))
put("tls_records", "ccs_after_handshake", b"\x00" + raw(bytes([20, 3, 3, 0, 1, 1])) + rec(23, b"x"))
put("tls_records", "truncated_record", b"\x00" + rec(23, b"x") + raw(bytes([23, 3, 3, 0, 40, 1, 2, 3])))
