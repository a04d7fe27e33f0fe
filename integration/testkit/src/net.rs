//! Loopback addresses for agents that tests start.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use rand_core::RngCore;

/// A loopback address with a port that was free a moment ago, on a random
/// address of 127.0.0.0/8 so that tests running at the same time do not
/// collide even when their ports do.
pub fn free_loopback() -> std::io::Result<SocketAddr> {
    let mut b = [0u8; 2];
    rand_core::OsRng.fill_bytes(&mut b);
    let ip = Ipv4Addr::new(127, 0, 1 + b[0] % 250, 2 + b[1] % 250);
    TcpListener::bind((ip, 0))?.local_addr()
}
