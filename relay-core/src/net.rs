//! The sockets the engines dial and accept beyond the tunnel, where std and tokio lack an
//! option: a connection from a chosen source address that reserves no port until it
//! connects, the destination a firewall redirected a connection from, and the host's own
//! addresses.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Connect to `to` from `source` (any port), or from the address the kernel picks.
///
/// A socket bound to `source:0` before `connect` would reserve a port there whatever the
/// destination, and ports left in TIME_WAIT (60 s) by a busy source would run out at a few
/// hundred connections a second, taking ports from every other program's `connect` on the
/// host too. With `IP_BIND_ADDRESS_NO_PORT` the port is chosen at `connect`, unique per
/// destination only, as an unbound socket's is.
///
/// # Errors
/// The socket could not be made or bound, or the connection failed (`TimedOut` past
/// `timeout`).
pub(crate) async fn connect_from(
    source: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let connect = async {
        let Some(source) = source else {
            return TcpStream::connect(to).await;
        };
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if source.is_ipv4() {
            setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        }
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(to).await
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A UDP socket bound to `source` (any port), connected to `to`: only `to`'s datagrams are
/// taken.
///
/// # Errors
/// The socket could not be bound or connected.
pub(crate) async fn udp_from(source: IpAddr, to: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await?;
    socket.connect(to).await?;
    Ok(socket)
}

/// Where a connection redirected to this host's listener by the firewall (nftables or
/// iptables `redirect`, conntrack NAT) was going: `SO_ORIGINAL_DST`. A connection that was
/// not redirected reports the listener's own address.
///
/// # Errors
/// The socket has no NAT entry (conntrack not loaded, or not a TCP socket).
pub(crate) fn original_destination(tcp: &TcpStream) -> io::Result<SocketAddr> {
    if tcp.local_addr()?.is_ipv4() {
        let raw = getsockopt(tcp, sockopt::OriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(raw))))
    } else {
        let raw = getsockopt(tcp, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(raw))))
    }
}

/// Every address on this host's interfaces (loopback included).
///
/// # Errors
/// The interface list could not be read.
pub(crate) fn own_addresses() -> io::Result<Vec<IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_a_chosen_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let source: IpAddr = "127.1.2.3".parse().unwrap();
        let tcp = connect_from(Some(source), to, Duration::from_secs(5))
            .await
            .unwrap();
        let (_, seen) = listener.accept().await.unwrap();
        assert_eq!(seen.ip(), source);
        assert_eq!(tcp.local_addr().unwrap().ip(), source);
    }

    #[test]
    fn own_addresses_include_loopback() {
        let own = own_addresses().unwrap();
        assert!(
            own.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
            "{own:?}"
        );
    }
}
