//! The hairpin set's bookkeeping in few bytes: how many Services DNAT to each endpoint
//! address, and each Service's addresses. At 10,000 Services x 10 endpoints these are 100,000
//! counts and as many addresses; an address is kept in its family's 4 or 16 bytes, not in an
//! `IpAddr`'s 17.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How many Services DNAT to each address.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    v4: HashMap<Ipv4Addr, u32>,
    v6: HashMap<Ipv6Addr, u32>,
}

impl Counts {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains_key(a),
            IpAddr::V6(a) => self.v6.contains_key(a),
        }
    }

    /// Counts one more Service for `ip`.
    pub fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => *self.v4.entry(a).or_default() += 1,
            IpAddr::V6(a) => *self.v6.entry(a).or_default() += 1,
        }
    }

    /// Counts one Service less for `ip`, forgetting it at zero.
    pub fn release(&mut self, ip: &IpAddr) {
        fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: &K) {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        match ip {
            IpAddr::V4(a) => dec(&mut self.v4, a),
            IpAddr::V6(a) => dec(&mut self.v6, a),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }

    /// Every address counted at least once.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .keys()
            .map(|a| IpAddr::V4(*a))
            .chain(self.v6.keys().map(|a| IpAddr::V6(*a)))
    }
}

/// One Service's addresses, each once, packed: a form byte, then 4 bytes per address when all
/// are IPv4, or 17 (a family byte and 16) otherwise. As small in a Service's record as the
/// `Box<[IpAddr]>` it replaces (10,000 of them at scale).
#[derive(Debug, Clone, Default)]
pub struct Addresses(Box<[u8]>);

const V4: u8 = 4;
const ANY: u8 = 0;

impl Addresses {
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let (form, rest) = self.0.split_first().map_or((V4, &[][..]), |(f, r)| (*f, r));
        let width = if form == V4 { 4 } else { 17 };
        rest.chunks_exact(width).map(move |c| {
            let mut octets = [0; 16];
            if let [a, b, c, d] = *c {
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            octets.copy_from_slice(&c[1..]);
            let v6 = Ipv6Addr::from(octets);
            match (c[0], v6.to_ipv4_mapped()) {
                (V4, Some(v4)) => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            }
        })
    }
}

impl FromIterator<IpAddr> for Addresses {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Addresses {
        let all: Vec<IpAddr> = iter.into_iter().collect();
        if all.is_empty() {
            return Addresses::default();
        }
        let mut b = Vec::new();
        if all.iter().all(IpAddr::is_ipv4) {
            b.reserve_exact(1 + 4 * all.len());
            b.push(V4);
            for ip in &all {
                if let IpAddr::V4(a) = ip {
                    b.extend_from_slice(&a.octets());
                }
            }
        } else {
            b.reserve_exact(1 + 17 * all.len());
            b.push(ANY);
            for ip in &all {
                let (family, v6) = match ip {
                    IpAddr::V4(a) => (V4, a.to_ipv6_mapped()),
                    IpAddr::V6(a) => (ANY, *a),
                };
                b.push(family);
                b.extend_from_slice(&v6.octets());
            }
        }
        Addresses(b.into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_forget_an_address_with_its_last_service() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::1".parse().unwrap();
        let mut c = Counts::default();
        c.add(a);
        c.add(a);
        c.add(b);
        assert_eq!(c.len(), 2);
        c.release(&a);
        assert!(c.contains(&a));
        c.release(&a);
        c.release(&b);
        assert!(!c.contains(&a) && !c.contains(&b));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn addresses_keep_every_address_of_either_family() {
        let v4: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let a: Addresses = v4.iter().copied().collect();
        assert_eq!(a.0.len(), 1 + 4 * 2);
        assert_eq!(a.iter().collect::<Vec<_>>(), v4);
        let v6: Vec<IpAddr> = vec!["fd00::1".parse().unwrap(), "::ffff:10.0.0.1".parse().unwrap()];
        let a: Addresses = v6.iter().copied().collect();
        assert_eq!(a.iter().collect::<Vec<_>>(), v6);
        let mixed: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let a: Addresses = mixed.iter().copied().collect();
        assert_eq!(a.iter().collect::<Vec<_>>(), mixed);
        assert_eq!(Addresses::default().iter().count(), 0);
    }
}
