//! Who the client is, for per-IP limits: the TCP peer, or, when the peer is
//! one of our own proxies (`TRUSTED_PROXIES`), the address it forwarded in
//! `X-Forwarded-For`. Only trusted peers are believed: anyone else could
//! write any address there and dodge the limits.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};

use crate::state::AppState;

/// One address or network, such as `10.0.0.0/8` or `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|e| format!("{e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

/// The proxies whose `X-Forwarded-For` is believed (empty: none).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<Network>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client behind `peer`: walking `X-Forwarded-For` from the right
    /// (the hop nearest us), the first address that is not a trusted proxy.
    ///
    /// Only the hops our proxies appended are believed; whatever lies left
    /// of the first untrusted one the client may have written. So when no
    /// untrusted hop is found (every hop a proxy of ours), or the first one
    /// is not an address at all, the answer is the peer: never a hop the
    /// client could have chosen.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_for
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|hop| !hop.is_empty());
        for hop in hops.rev() {
            match parse_hop(hop) {
                Some(ip) if self.trusts(ip) => continue,
                Some(ip) => return ip,
                // Not a proxy of ours wrote it (`unknown`, garbage): nothing
                // left of it can be believed.
                None => break,
            }
        }
        peer
    }
}

/// One `X-Forwarded-For` hop: an address, with or without a port (some
/// proxies, Azure Application Gateway among them, write `ip:port`, and
/// `[v6]:port` for IPv6), or a bracketed IPv6 address.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

/// The client's address, as the per-IP limits count it.
pub struct ClientIp(pub String);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
        else {
            return Ok(Self("unknown".into()));
        };
        // Several X-Forwarded-For headers count as one list, in order.
        let forwarded: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
        let proxies = &state.limiter.limits.trusted_proxies;
        Ok(Self(proxies.client(peer, forwarded.as_deref()).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|s| s.parse().unwrap()).collect())
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let p = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            p.client(ip("203.0.113.9"), Some("1.2.3.4")),
            ip("203.0.113.9")
        );
        assert_eq!(
            TrustedProxies::default().client(ip("10.0.0.1"), Some("1.2.3.4")),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.1"]);
        // A client that wrote its own header: the spoofed left entry is ignored.
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("6.6.6.6, 198.51.100.7, 192.168.1.1")),
            ip("198.51.100.7")
        );
        assert_eq!(
            p.client(ip("::ffff:10.1.2.3"), Some("198.51.100.7")),
            ip("198.51.100.7")
        );
        assert_eq!(p.client(ip("10.1.2.3"), None), ip("10.1.2.3"));
        assert_eq!(p.client(ip("10.1.2.3"), Some("garbage")), ip("10.1.2.3"));
    }

    #[test]
    fn with_no_untrusted_hop_the_peer_is_the_client_never_a_written_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        // Every hop a proxy of ours: the leftmost one may be the client's
        // own writing, so it is not believed.
        assert_eq!(p.client(ip("10.1.2.3"), Some("10.9.9.9")), ip("10.1.2.3"));
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("10.6.6.6, 10.0.0.7")),
            ip("10.1.2.3")
        );
        // An unparseable hop ends the trusted chain: what lies left of it
        // is the client's writing.
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("6.6.6.6, unknown, 10.0.0.7")),
            ip("10.1.2.3")
        );
        // Empty entries (a trailing comma) are no hop at all.
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("198.51.100.7, ,10.0.0.7,")),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn hops_with_ports_and_brackets_are_read() {
        let p = proxies(&["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("6.6.6.6, 198.51.100.7:50123")),
            ip("198.51.100.7")
        );
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("[2001:db9::5]:443, 10.0.0.7:8080")),
            ip("2001:db9::5")
        );
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("[2001:db9::6]")),
            ip("2001:db9::6")
        );
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("2001:db9::7, [2001:db8::1]:80")),
            ip("2001:db9::7")
        );
        // A trusted proxy written with its port is still recognised as ours.
        assert_eq!(
            p.client(ip("10.1.2.3"), Some("6.6.6.6, 10.0.0.7:8080")),
            ip("6.6.6.6")
        );
    }

    #[test]
    fn networks_parse_and_match() {
        let n: Network = "2001:db8::/32".parse().unwrap();
        assert!(n.contains(ip("2001:db8::1")));
        assert!(!n.contains(ip("2001:db9::1")));
        assert!(
            "0.0.0.0/0"
                .parse::<Network>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
    }
}
