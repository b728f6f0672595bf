//! HTTP/2 on the `h2` crate directly, without hyper's hand-offs between a
//! connection's task and a task per stream or per request: [`server`]
//! serves a connection's streams inside the connection's own task,
//! [`client`] lets each request's task drive its own stream, and [`body`]
//! carries bodies across both.

pub mod body;
pub mod client;
pub mod server;

pub use crate::http::BoxError;
