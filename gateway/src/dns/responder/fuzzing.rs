//! The responder's answering rules without sockets, for the fuzz targets in
//! `fuzz/` (reached through [`crate::fuzzing`]): the same [`Authority`] the
//! UDP and TCP loops ask, built from a table the target chooses. Not an API.

use std::sync::Arc;

use super::{Authority, Transport};
use crate::catalog::routes::VipTable;

/// The authority for one VIP table.
pub struct Responder(Authority);

impl Responder {
    pub fn new(table: Arc<VipTable>) -> Self {
        Responder(Authority::new(table))
    }

    /// The wire answer to `packet` received over UDP (`tcp` false) or TCP,
    /// or `None` when the responder drops it.
    pub fn respond(&self, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        self.0.respond(packet, transport)
    }
}
