//! Route ports inside the ephemeral port range. A pod's connection masqueraded through the
//! node keeps its source port where it can, and the pods' range is most likely the node's
//! (the default); when that port is a route's, the packets leave from and return to a local
//! address on the route's port, and the classifiers count them as the route's live traffic.
//! This namespace's own connections skip a port the proxy listens on, but not while it does
//! not (a restart), and then also keep the proxy from binding it.

use std::{fs, ops::RangeInclusive};

use crate::config::Config;

const RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// What to warn about route ports the kernel may pick as source ports, if any; `None` also
/// when the sysctls cannot be read (nothing to say then).
#[must_use]
pub fn warning(config: &Config) -> Option<String> {
    let range = parse_range(&fs::read_to_string(RANGE_SYSCTL).ok()?)?;
    let reserved = parse_reserved(&fs::read_to_string(RESERVED_SYSCTL).ok()?)?;
    let mut exposed: Vec<u16> = config
        .routes
        .iter()
        .flat_map(|route| route.ports.iter().copied())
        .filter(|port| range.contains(port) && !reserved.iter().any(|r| r.contains(port)))
        .collect();
    exposed.sort_unstable();
    exposed.dedup();
    if exposed.is_empty() {
        return None;
    }
    let list: Vec<String> = exposed.iter().map(u16::to_string).collect();
    let list = list.join(",");
    Some(format!(
        "route port(s) {list} lie in the ephemeral port range ({}-{}): a pod's connection \
         masqueraded through this host may keep one as its source port, and its traffic on the \
         interfaces then counts as the route's live bytes; this host's own connections may take \
         one while the proxy is not listening. Move the route below the range, or reserve the \
         port(s) in this namespace and the pods' (net.ipv4.ip_local_reserved_ports={list}, a \
         per-namespace sysctl, kept in /etc/sysctl.d)",
        range.start(),
        range.end()
    ))
}

/// `ip_local_port_range`: two numbers, the first and last port.
fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let (first, last) = (numbers.next()?.ok()?, numbers.next()?.ok()?);
    Some(first..=last)
}

/// `ip_local_reserved_ports`: ports and ranges separated by commas, or nothing.
fn parse_reserved(text: &str) -> Option<Vec<RangeInclusive<u16>>> {
    text.trim()
        .split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            Some(first.parse().ok()?..=last.parse().ok()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sysctls_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("32768\n"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8080,50000-50010\n"),
            Some(vec![8080..=8080, 50000..=50010])
        );
        assert_eq!(parse_reserved("8080,x\n"), None);
    }
}
