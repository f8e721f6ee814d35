//! The client allow-list (issue: who may connect). Checked on accept, before a byte of
//! RPC is read; everyone else is disconnected. In cluster mode the list is the cluster's
//! node addresses, replaced as nodes come and go, so pods cannot reach volumes directly.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

/// One network in CIDR notation (`10.0.0.0/8`, `127.0.0.1`, `fd00::/8`); in JSON, that
/// string.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// The network holding exactly `ip`.
    pub fn host(ip: IpAddr) -> Self {
        Self {
            addr: ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
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
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for Network {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The current allow-list, shared with whatever keeps it up to date.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Arc<RwLock<Vec<Network>>>);

impl AllowList {
    pub fn new(nets: Vec<Network>) -> Self {
        Self(Arc::new(RwLock::new(nets)))
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n.contains(ip))
    }

    /// Replaces the list (e.g. when the cluster's nodes change).
    pub fn replace(&self, nets: Vec<Network>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = nets;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn networks_match_by_prefix() {
        let cases = [
            ("127.0.0.0/8", "127.0.0.2", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("10.1.0.0/16", "10.1.255.3", true),
            ("10.1.0.0/16", "10.2.0.1", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("127.0.0.1", "::ffff:127.0.0.1", true),
            ("10.0.0.0/8", "::1", false),
        ];
        for (net, addr, want) in cases {
            let n: Network = net.parse().expect("network");
            assert_eq!(n.contains(ip(addr)), want, "{net} ∋ {addr}");
        }
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for bad in ["", "x", "10.0.0.0/33", "::/129", "1.2.3.4/-1"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_list_can_be_replaced_while_shared() {
        let list = AllowList::new(vec!["127.0.0.1".parse().expect("net")]);
        let shared = list.clone();
        assert!(shared.allows(ip("127.0.0.1")));
        list.replace(vec!["127.0.0.2".parse().expect("net")]);
        assert!(!shared.allows(ip("127.0.0.1")));
        assert!(shared.allows(ip("127.0.0.2")));
    }
}
