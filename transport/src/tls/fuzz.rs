//! Entry points for fuzz targets, not an API: the receiving side of the
//! record layer ([`Inbound`], the code connections run) without sockets or
//! a handshake, under a fixed AES-256-GCM key.

use rustls::ConnectionTrafficSecrets;
use rustls::crypto::cipher::{AeadKey, Iv};

use super::{APPLICATION_DATA, Framing, HEADER, Inbound, Keys, Refused, Schedule, TAG, alert_name};

fn keys(key: [u8; 32], iv: [u8; 12], tls13: bool, seq: u64) -> Keys {
    let secrets = ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from(key),
        iv: Iv::new(iv),
    };
    match Keys::new((seq, secrets), tls13) {
        Ok(keys) => keys,
        // A 32-byte key and 12-byte IV always fit AES-256-GCM.
        Err(e) => unreachable!("{e}"),
    }
}

/// Keeps the same key across a KeyUpdate; takes any ticket.
struct Fixed([u8; 32], [u8; 12]);

impl Schedule for Fixed {
    fn next_rx(&mut self) -> std::io::Result<Keys> {
        Ok(keys(self.0, self.1, true, 0))
    }

    fn ticket(&mut self, _: &[u8]) -> Result<(), (u8, String)> {
        Ok(())
    }
}

/// One record as our write path seals it: inner type `typ`, `content`
/// and (TLS 1.3) `padding` zero bytes, under `key` and `iv` with
/// sequence number `seq`. Content and padding together stay under
/// 2^16 - 64 bytes (the length field is 16 bits).
pub fn seal(
    key: [u8; 32],
    iv: [u8; 12],
    tls13: bool,
    seq: u64,
    typ: u8,
    content: &[u8],
    padding: usize,
) -> Vec<u8> {
    let mut keys = keys(key, iv, tls13, seq);
    let mut rec = vec![0; HEADER + keys.explicit_len()];
    rec.extend_from_slice(content);
    if keys.framing == Framing::Tls13 {
        rec.push(typ);
        rec.resize(rec.len() + padding, 0);
    }
    rec.resize(rec.len() + TAG, 0);
    let outer = if tls13 { APPLICATION_DATA } else { typ };
    match keys.seal_record(&mut rec, outer) {
        Ok(()) => rec,
        Err(e) => unreachable!("{e}"),
    }
}

/// Opens the records of `wire` in order, as a connection whose peer
/// seals under `key` and `iv` from sequence number 0 would (a KeyUpdate
/// keeps the key). Returns the application data handed out, and why it
/// stopped: `None` when `wire` ran out or a close_notify came, else
/// the error (naming the alert we would send, if any).
pub fn open(key: [u8; 32], iv: [u8; 12], tls13: bool, wire: &[u8]) -> (Vec<u8>, Option<String>) {
    let mut inbound = Inbound::new(keys(key, iv, tls13, 0), false);
    let mut schedule = Fixed(key, iv);
    let mut buf = wire.to_vec();
    let mut data = Vec::new();
    let mut at = 0;
    while !inbound.closed {
        let rest = &mut buf[at..];
        match inbound.open(rest, &mut schedule) {
            Ok(None) => break,
            Ok(Some((record, content))) => {
                data.extend_from_slice(&rest[content]);
                at += record;
            }
            Err(Refused::Alert(alert, what)) => {
                let why = format!("alert {alert} ({}): {what}", alert_name(alert));
                return (data, Some(why));
            }
            Err(Refused::PeerAlert(why)) => return (data, Some(why)),
            Err(Refused::Io(e)) => return (data, Some(e.to_string())),
        }
    }
    (data, None)
}
