//! The rules of the receiving side, without I/O: [`Inbound`] opens records
//! in the caller's buffer and holds the peer to RFC 8446 §5-6 (see the
//! module doc of `tls`), answering a fault with the fatal alert rustls
//! would send.

use std::io;

use aws_lc_rs::aead::{self, Aad, Nonce};

use super::*;

/// Why the peer's records are refused.
pub(super) enum Refused {
    /// A fault of the peer's, to be answered with this fatal alert.
    Alert(u8, String),
    /// The peer ended the connection with a fatal alert.
    PeerAlert(String),
    /// Our side cannot go on (sequence numbers exhausted, no next key).
    Io(io::Error),
}

pub(super) fn refuse(alert: u8, what: &str) -> Refused {
    Refused::Alert(alert, what.to_owned())
}

/// The receiving side of the record layer, without I/O: it opens records
/// in the caller's buffer and applies what they carry, holding the peer to
/// the limits in the module doc.
pub(super) struct Inbound {
    pub(super) rx: Keys,
    /// Handshake bytes of a message that spans records (rare).
    pub(super) handshake: Vec<u8>,
    /// KeyUpdates and tickets since the last application data.
    pub(super) post_handshake: u8,
    /// Empty application data records in a row.
    pub(super) empty_records: u8,
    /// Warning alerts received.
    pub(super) warnings: u8,
    /// close_notify received.
    pub(super) closed: bool,
    /// The peer asked for a key update we have not sent yet: one answers
    /// every request received before it goes out (RFC 8446 §4.6.3).
    pub(super) update_owed: bool,
}

impl Inbound {
    pub(super) fn new(rx: Keys, closed: bool) -> Inbound {
        Inbound {
            rx,
            handshake: Vec::new(),
            post_handshake: 0,
            empty_records: 0,
            warnings: 0,
            closed,
            update_owed: false,
        }
    }

    /// Opens the record at the front of `buf` in place and applies what
    /// it carries. None: the record is not whole yet. Otherwise the
    /// record's length and where in `buf` the application data it carries
    /// lies (empty for alerts and handshake messages, handled here).
    ///
    /// Long because it applies every record-layer rule of RFC 8446 §5-6
    /// in order on one record; each is a short independent check.
    pub(super) fn open(
        &mut self,
        buf: &mut [u8],
        schedule: &mut impl Schedule,
    ) -> Result<Option<(usize, Range<usize>)>, Refused> {
        let Some(&[typ, major, minor, hi, lo]) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let header = [typ, major, minor, hi, lo];
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let tls13 = self.rx.framing == Framing::Tls13;
        let allowed = if tls13 {
            typ == APPLICATION_DATA
        } else {
            matches!(typ, APPLICATION_DATA | ALERT | HANDSHAKE)
        };
        if !allowed {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("record of type {typ} after the handshake"),
            ));
        }
        let explicit = self.rx.explicit_len();
        let shortest = explicit + TAG + usize::from(tls13);
        if len > MAX_CIPHERTEXT {
            return Err(refuse(
                RECORD_OVERFLOW,
                &format!("record length {len} outside {shortest}..={MAX_CIPHERTEXT}"),
            ));
        }
        if len < shortest {
            // Too short to carry a tag: it cannot be authenticated.
            return Err(refuse(
                BAD_RECORD_MAC,
                &format!("record length {len} outside {shortest}..={MAX_CIPHERTEXT}"),
            ));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let seq = self.rx.take_seq().map_err(Refused::Io)?;
        let mut nonce = self.rx.nonce(seq);
        if explicit > 0 {
            // The explicit part as the record carries it.
            nonce[aead::NONCE_LEN - explicit..].copy_from_slice(&buf[HEADER..HEADER + explicit]);
        }
        let body = HEADER + explicit..HEADER + len;
        let (aad, aad_len) = self.rx.aad(seq, &header, body.len() - TAG);
        let opened = match self.rx.key.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..aad_len]),
            &mut buf[body.clone()],
        ) {
            Ok(opened) => opened.len(),
            Err(_) => {
                return Err(refuse(
                    BAD_RECORD_MAC,
                    "a record failed to decrypt (bad_record_mac)",
                ));
            }
        };
        // TLS 1.3 counts the content type in (RFC 8446 §5.4), padding too.
        let most = MAX_PLAINTEXT + usize::from(tls13);
        if opened > most {
            return Err(refuse(
                RECORD_OVERFLOW,
                &format!("a record's plaintext is {opened} bytes, over {most}"),
            ));
        }
        let (typ, content_len) = if tls13 {
            // Inner plaintext: content, content type, zero padding.
            let inner = &buf[body.start..body.start + opened];
            match inner.iter().rposition(|&b| b != 0) {
                Some(at) => (inner[at], at),
                None => {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        "a record carries no content type",
                    ));
                }
            }
        } else {
            (typ, opened)
        };
        let record = HEADER + len;
        let content = body.start..body.start + content_len;
        // RFC 8446 §5.1: nothing between the fragments of a handshake message.
        if typ != HANDSHAKE && !self.handshake.is_empty() {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("a record of type {typ} between the fragments of a handshake message"),
            ));
        }
        if content_len > 0 {
            self.empty_records = 0;
        }
        match typ {
            APPLICATION_DATA if content_len == 0 => {
                self.empty_records += 1;
                if self.empty_records > MAX_EMPTY_RECORDS {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        &format!("more than {MAX_EMPTY_RECORDS} empty records in a row"),
                    ));
                }
            }
            APPLICATION_DATA => {
                self.post_handshake = 0;
                return Ok(Some((record, content)));
            }
            ALERT => self.alert(&buf[content])?,
            HANDSHAKE if content_len == 0 => {
                return Err(refuse(UNEXPECTED_MESSAGE, "an empty handshake record"));
            }
            HANDSHAKE if tls13 => self.handshake_messages(&buf[content], schedule)?,
            HANDSHAKE => {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    "the peer tried to renegotiate TLS 1.2",
                ));
            }
            other => {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    &format!("record of inner type {other}"),
                ));
            }
        }
        Ok(Some((record, 0..0)))
    }

    /// An alert from the peer, judged as rustls judges it: close_notify
    /// ends the stream, a fatal alert the connection; a warning is passed
    /// over (TLS 1.3 allows only user_canceled, which a close_notify is to
    /// follow), up to [`MAX_WARNINGS`].
    pub(super) fn alert(&mut self, content: &[u8]) -> Result<(), Refused> {
        let &[level, description] = content else {
            return Err(refuse(DECODE_ERROR, "malformed alert"));
        };
        if !matches!(level, WARNING | FATAL) {
            return Err(refuse(
                ILLEGAL_PARAMETER,
                &format!("alert {description} of unknown level {level}"),
            ));
        }
        if description == CLOSE_NOTIFY {
            self.closed = true;
            return Ok(());
        }
        if level == FATAL {
            let message = format!(
                "tls: the peer sent fatal alert {description} ({})",
                alert_name(description)
            );
            return Err(Refused::PeerAlert(message));
        }
        self.warnings += 1;
        if self.warnings > MAX_WARNINGS {
            return Err(refuse(
                UNEXPECTED_MESSAGE,
                &format!("more than {MAX_WARNINGS} warning alerts"),
            ));
        }
        if self.rx.framing == Framing::Tls13 && description != USER_CANCELED {
            return Err(refuse(
                DECODE_ERROR,
                &format!(
                    "warning alert {description} ({}): TLS 1.3 has no warnings but user_canceled",
                    alert_name(description)
                ),
            ));
        }
        Ok(())
    }

    /// NewSessionTicket and KeyUpdate: the handshake messages TLS 1.3 sends
    /// after the handshake (RFC 8446 §4.6).
    pub(super) fn handshake_messages(
        &mut self,
        content: &[u8],
        schedule: &mut impl Schedule,
    ) -> Result<(), Refused> {
        let mut messages = std::mem::take(&mut self.handshake);
        messages.extend_from_slice(content);
        let mut rest = &messages[..];
        while let [typ, a, b, c, body @ ..] = rest {
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            let Some((body, after)) = body.split_at_checked(len) else {
                break;
            };
            self.post_handshake += 1;
            if self.post_handshake > MAX_POST_HANDSHAKE {
                return Err(refuse(
                    UNEXPECTED_MESSAGE,
                    &format!(
                        "more than {MAX_POST_HANDSHAKE} KeyUpdate or NewSessionTicket messages without application data"
                    ),
                ));
            }
            match *typ {
                NEW_SESSION_TICKET => {
                    schedule
                        .ticket(body)
                        .map_err(|(alert, what)| Refused::Alert(alert, what))?;
                }
                KEY_UPDATE => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        [other] => {
                            return Err(refuse(
                                ILLEGAL_PARAMETER,
                                &format!("KeyUpdate with request_update {other}"),
                            ));
                        }
                        _ => return Err(refuse(DECODE_ERROR, "malformed KeyUpdate")),
                    };
                    if !after.is_empty() {
                        // RFC 8446 §5.1: a key change ends its record.
                        return Err(refuse(
                            UNEXPECTED_MESSAGE,
                            "a KeyUpdate does not end its record",
                        ));
                    }
                    self.rx = schedule.next_rx().map_err(Refused::Io)?;
                    // Answered before our next record (in `poll_read` if we
                    // do not write), once for all the requests before it.
                    self.update_owed |= requested;
                }
                other => {
                    return Err(refuse(
                        UNEXPECTED_MESSAGE,
                        &format!("handshake message of type {other} after the handshake"),
                    ));
                }
            }
            rest = after;
        }
        if rest.len() > MAX_PLAINTEXT {
            return Err(refuse(DECODE_ERROR, "a handshake message is too long"));
        }
        self.handshake = rest.to_vec();
        Ok(())
    }
}

/// The name RFC 8446 §6 gives alert `description`, for error messages.
pub(super) fn alert_name(description: u8) -> &'static str {
    match description {
        CLOSE_NOTIFY => "close_notify",
        UNEXPECTED_MESSAGE => "unexpected_message",
        BAD_RECORD_MAC => "bad_record_mac",
        RECORD_OVERFLOW => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        ILLEGAL_PARAMETER => "illegal_parameter",
        DECODE_ERROR => "decode_error",
        51 => "decrypt_error",
        80 => "internal_error",
        USER_CANCELED => "user_canceled",
        _ => "other",
    }
}
