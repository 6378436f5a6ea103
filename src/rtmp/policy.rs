//! Where the CDN push may connect: the operator's destination policy (`bridge.destination_*`).
//!
//! A host names a destination URL and the server connects to it, so without a policy a host
//! could make the server open TCP connections to its own loopback services or the operator's
//! private network and read the outcome from the bridge status (a port scanner). Destinations
//! asked for by non-admin callers are therefore checked twice:
//! - when requested: scheme, host name allow-list, and a literal IP address against the ranges;
//! - right before every connect, on the addresses the name RESOLVES to at that moment (DNS may
//!   answer differently later, or `127.1` / `2130706433` may spell loopback): a denied address
//!   is never connected to.
//!
//! Built-in denied ranges: unspecified, "this network", loopback, private (RFC 1918, ULA),
//! shared (CGNAT), link-local, multicast, reserved/broadcast, benchmarking and documentation.
//! Operators widen it with `destination_allow` and narrow it with `destination_deny`;
//! `bridge.auto_destinations` and (by default) admin callers are trusted and skip it.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use crate::config::{BridgeSettings, Cidr, canonical_ip};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("scheme {0:?} is not allowed (bridge.destination_schemes)")]
    Scheme(String),
    #[error("host {0:?} is not in bridge.destination_hosts")]
    Host(String),
    /// The message names no address: the caller may be probing.
    #[error("the destination's address is not allowed")]
    Address,
}

const BUILTIN_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

static BUILTIN: LazyLock<Vec<Cidr>> =
    LazyLock::new(|| BUILTIN_DENY.iter().filter_map(|c| c.parse().ok()).collect());

/// The operator's rules for destinations of non-admin callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationPolicy {
    schemes: Vec<String>,
    hosts: Vec<String>,
    deny: Vec<Cidr>,
    allow: Vec<Cidr>,
}

/// Whether a destination's connects are checked: `Trusted` for operator-configured
/// destinations and trusted admins, `Checked` for everyone else.
#[derive(Debug, Clone)]
pub enum Guard {
    Trusted,
    Checked(Arc<DestinationPolicy>),
}

impl Guard {
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), PolicyError> {
        match self {
            Guard::Trusted => Ok(()),
            Guard::Checked(p) => p.check_addr(ip),
        }
    }

    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        match self {
            Guard::Trusted => Ok(()),
            Guard::Checked(p) => p.check_url(url),
        }
    }
}

impl DestinationPolicy {
    pub fn from_settings(b: &BridgeSettings) -> Self {
        Self {
            schemes: b
                .destination_schemes
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            hosts: b
                .destination_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            deny: b.destination_deny.clone(),
            allow: b.destination_allow.clone(),
        }
    }

    /// Check what the URL itself says: scheme, host name, and a literal address.
    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| PolicyError::Scheme(String::new()))?;
        let scheme = scheme.to_ascii_lowercase();
        if !self.schemes.contains(&scheme) {
            return Err(PolicyError::Scheme(scheme));
        }
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| host_matches(h, &host)) {
            return Err(PolicyError::Host(host));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_addr(ip)?;
        }
        Ok(())
    }

    /// Check one resolved address.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), PolicyError> {
        let ip = canonical_ip(ip);
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(PolicyError::Address);
        }
        let builtin = BUILTIN.iter().any(|c| c.contains(ip)) || embeds_denied_v4(ip);
        if builtin && !self.allow.iter().any(|c| c.contains(ip)) {
            return Err(PolicyError::Address);
        }
        Ok(())
    }
}

/// IPv4-compatible (`::a.b.c.d`) and 6to4 (`2002:a.b.c.d::`) addresses carry an IPv4 address a
/// relay may deliver to; judge them by it.
fn embeds_denied_v4(ip: IpAddr) -> bool {
    let IpAddr::V6(v6) = ip else { return false };
    let s = v6.segments();
    let inner = if s[..6].iter().all(|x| *x == 0) {
        Some(std::net::Ipv4Addr::from(
            (u32::from(s[6]) << 16) | u32::from(s[7]),
        ))
    } else if s[0] == 0x2002 {
        Some(std::net::Ipv4Addr::from(
            (u32::from(s[1]) << 16) | u32::from(s[2]),
        ))
    } else {
        None
    };
    inner.is_some_and(|v4| BUILTIN.iter().any(|c| c.contains(IpAddr::V4(v4))))
}

/// `pattern` is a name, or `*.suffix` for any name under suffix (not suffix itself).
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DestinationPolicy {
        DestinationPolicy::from_settings(&BridgeSettings::default())
    }

    fn denied(p: &DestinationPolicy, ip: &str) -> bool {
        p.check_addr(ip.parse().unwrap()).is_err()
    }

    #[test]
    fn internal_ranges_are_denied_by_default() {
        let p = policy();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "2002:a00:1::",
        ] {
            assert!(denied(&p, ip), "{ip} must be denied");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!denied(&p, ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn operator_allow_and_deny_ranges() {
        let b = BridgeSettings {
            destination_allow: vec!["10.9.0.0/16".parse().unwrap()],
            destination_deny: vec![
                "10.9.9.0/24".parse().unwrap(),
                "203.0.114.0/24".parse().unwrap(),
            ],
            ..Default::default()
        };
        let p = DestinationPolicy::from_settings(&b);
        assert!(!denied(&p, "10.9.1.1"), "allowed exception");
        assert!(denied(&p, "10.9.9.1"), "deny wins over allow");
        assert!(denied(&p, "10.8.1.1"), "rest of 10/8 still denied");
        assert!(denied(&p, "203.0.114.7"), "operator's extra range");
        assert!(
            denied(&p, "::ffff:203.0.114.7"),
            "mapped address judged as IPv4"
        );
    }

    #[test]
    fn urls_are_checked_for_scheme_host_and_literal_addresses() {
        let p = policy();
        assert!(p.check_url("rtmp://live.example.com/app/key").is_ok());
        assert_eq!(
            p.check_url("rtmp://127.0.0.1:1/app/key"),
            Err(PolicyError::Address)
        );
        assert_eq!(
            p.check_url("rtmp://[::1]:1935/app/key"),
            Err(PolicyError::Address)
        );
        assert_eq!(
            p.check_url("rtmp://10.0.0.5/app/key"),
            Err(PolicyError::Address)
        );
        assert!(matches!(
            p.check_url("rtmps://live.example.com/app/key"),
            Err(PolicyError::Scheme(_))
        ));
        let b = BridgeSettings {
            destination_hosts: vec!["*.cdn.example.com".into(), "push.example.net".into()],
            ..Default::default()
        };
        let p = DestinationPolicy::from_settings(&b);
        assert!(p.check_url("rtmp://a.cdn.example.com/live/k").is_ok());
        assert!(p.check_url("rtmp://PUSH.example.net.:1935/live/k").is_ok());
        assert!(p.check_url("rtmp://cdn.example.com/live/k").is_err());
        assert!(p.check_url("rtmp://evilcdn.example.com/live/k").is_err());
        assert!(p.check_url("rtmp://8.8.8.8/live/k").is_err());
        // Trusted callers skip all of it.
        assert!(Guard::Trusted.check_url("rtmp://127.0.0.1:1/a/b").is_ok());
        assert!(
            Guard::Trusted
                .check_addr("10.0.0.1".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains("1.2.3.4".parse().unwrap()));
        let c: Cidr = "::/0".parse().unwrap();
        assert!(c.contains("2001::1".parse().unwrap()));
        assert!(!c.contains("1.2.3.4".parse().unwrap()));
        let c: Cidr = "1.2.3.4".parse().unwrap();
        assert_eq!(c.prefix, 32);
    }
}
