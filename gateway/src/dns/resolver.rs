//! Resolution of backend and peer addresses given as names.
//! (Placeholder body using the system resolver; being replaced by hickory.)

use std::io;
use std::net::SocketAddr;

/// Resolves `host:port` to socket addresses. An IP literal is returned as is.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}
