//! The keys of one connection: the AEAD key, IV, framing and sequence
//! number of each direction, sealing one record in place, and what the
//! receiving side needs of rustls's key schedule after the handshake (the
//! peer's next key, the tickets a server sends). No I/O here.

use std::io;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use super::*;

pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    pub(super) fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    pub(super) fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
}

/// How records are framed and their nonces made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Framing {
    /// RFC 8446 §5.2: the content type inside, outer type application data.
    Tls13,
    /// RFC 5246 §6.2.3.3: the content type outside; AES-GCM sends 8 bytes of
    /// explicit nonce before the ciphertext (RFC 5288), ChaCha20 does not
    /// (RFC 7905).
    Tls12 { explicit: bool },
}

/// One direction's key, IV, framing and record sequence number.
pub(super) struct Keys {
    pub(super) key: LessSafeKey,
    pub(super) iv: [u8; aead::NONCE_LEN],
    pub(super) seq: u64,
    pub(super) framing: Framing,
}

impl Keys {
    pub(super) fn new(
        (seq, secrets): (u64, ConnectionTrafficSecrets),
        tls13: bool,
    ) -> io::Result<Keys> {
        let (alg, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => {
                return Err(protocol(
                    "the negotiated cipher is not supported by the data plane",
                ));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| protocol("the negotiated traffic key has the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| protocol("the negotiated IV has the wrong length"))?;
        let framing = if tls13 {
            Framing::Tls13
        } else {
            Framing::Tls12 { explicit: gcm }
        };
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
            framing,
        })
    }

    /// Bytes of explicit nonce after the header.
    pub(super) fn explicit_len(&self) -> usize {
        match self.framing {
            Framing::Tls12 { explicit: true } => 8,
            _ => 0,
        }
    }

    /// The next record's sequence number, consumed.
    pub(super) fn take_seq(&mut self) -> io::Result<u64> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| protocol("record sequence number exhausted"))?;
        Ok(seq)
    }

    /// The IV with `seq` folded into its last 8 bytes (RFC 8446 §5.3; rustls
    /// and we use the same for TLS 1.2, sending the last 8 bytes as the
    /// explicit part of an AES-GCM nonce).
    pub(super) fn nonce(&self, seq: u64) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(seq.to_be_bytes())
        {
            *n ^= s;
        }
        nonce
    }

    /// Seals the record laid out in `rec`: header, explicit nonce (TLS 1.2
    /// AES-GCM), plaintext (ending with its content type in TLS 1.3), and
    /// room for the tag. Fills in everything but the plaintext.
    pub(super) fn seal_record(&mut self, rec: &mut [u8], outer: u8) -> io::Result<()> {
        let explicit = self.explicit_len();
        let body = HEADER + explicit;
        let plaintext = rec.len() - body - TAG;
        let len = explicit + plaintext + TAG;
        let header = [outer, 3, 3, (len >> 8) as u8, (len & 0xff) as u8];
        rec[..HEADER].copy_from_slice(&header);
        let seq = self.take_seq()?;
        let nonce = self.nonce(seq);
        rec[HEADER..body].copy_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
        let (aad, aad_len) = self.aad(seq, &header, plaintext);
        let (data, tag_room) = rec[body..].split_at_mut(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                data,
            )
            .map_err(|_| protocol("sealing a record failed"))?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// The additional data of a record: its header in TLS 1.3; sequence
    /// number, type, version and plaintext length in TLS 1.2.
    pub(super) fn aad(
        &self,
        seq: u64,
        header: &[u8; HEADER],
        plaintext: usize,
    ) -> ([u8; 13], usize) {
        let mut aad = [0; 13];
        match self.framing {
            Framing::Tls13 => {
                aad[..HEADER].copy_from_slice(header);
                (aad, HEADER)
            }
            Framing::Tls12 { .. } => {
                aad[..8].copy_from_slice(&seq.to_be_bytes());
                aad[8..11].copy_from_slice(&header[..3]);
                aad[11..].copy_from_slice(&(plaintext as u16).to_be_bytes());
                (aad, 13)
            }
        }
    }
}

/// What the receiving side needs of the key schedule after the handshake.
pub(super) trait Schedule {
    /// The peer's next key, after its KeyUpdate.
    fn next_rx(&mut self) -> io::Result<Keys>;
    /// A NewSessionTicket; a refusal names its alert.
    fn ticket(&mut self, body: &[u8]) -> Result<(), (u8, String)>;
}

impl Schedule for Kernel {
    fn next_rx(&mut self) -> io::Result<Keys> {
        Keys::new(self.update_rx().map_err(tls_err)?, true)
    }

    fn ticket(&mut self, body: &[u8]) -> Result<(), (u8, String)> {
        match self {
            Kernel::Client(k) => k
                .handle_new_session_ticket(body)
                .map_err(|e| (DECODE_ERROR, format!("a NewSessionTicket: {e}"))),
            Kernel::Server(_) => Err((
                UNEXPECTED_MESSAGE,
                "the client sent a NewSessionTicket".to_owned(),
            )),
        }
    }
}
