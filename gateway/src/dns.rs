//! DNS: the VIP table for imported services ([`vip`]), the responder that
//! answers imported names with those VIPs, and the resolver for backend and
//! peer addresses given as names.

pub mod resolver;
pub mod responder;
pub mod vip;
