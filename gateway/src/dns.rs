//! DNS: the responder that answers imported names from the catalog's route
//! table ([`crate::catalog::routes`]), and the resolver for backend and peer
//! addresses given as names. Nothing here decides an address or a route.

pub mod resolver;
pub mod responder;
