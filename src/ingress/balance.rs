//! Choosing where one request goes: the canary or the main backend, then one endpoint of it
//! (round-robin, or the one a session-affinity cookie names).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::annotations::Canary;
use super::routes::Backend;

/// Round-robin positions past this many backends are forgotten (route tables are rebuilt
/// whole, so positions of backends that no longer exist would pile up).
const MAX_POSITIONS: usize = 4096;

/// Round-robin positions per backend, and the random source for canary weights. Each worker
/// has its own, so its lock is never contended.
#[derive(Debug)]
pub struct Balancer {
    /// Keyed by the backend's address in the current route table: no allocation per request.
    next: Mutex<foldhash::HashMap<usize, usize>>,
    seed: AtomicU64,
}

impl Default for Balancer {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
        Balancer {
            next: Mutex::new(foldhash::HashMap::default()),
            seed: AtomicU64::new(seed),
        }
    }
}

/// The value an affinity cookie carries for an endpoint: a short hash, so pod addresses are not exposed.
pub fn affinity_value(addr: &SocketAddr) -> String {
    let d = Sha256::digest(addr.to_string().as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Balancer {
    /// A number in 0..100, uniformly enough for canary weights (xorshift64*).
    fn percent(&self) -> u32 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % 100
    }

    /// Whether this request goes to the canary: the header decides when set to `always` or
    /// `never`, otherwise the weight.
    pub fn use_canary(&self, canary: &Canary, header_value: Option<&str>) -> bool {
        match header_value.map(str::trim) {
            Some("always") => return true,
            Some("never") => return false,
            _ => {}
        }
        canary.weight > 0 && self.percent() < canary.weight
    }

    /// The endpoint for the next request to `backend`, skipping `exclude`. An affinity value
    /// that names a live endpoint pins the request to it.
    pub fn pick(
        &self,
        backend: &Backend,
        endpoints: &[SocketAddr],
        affinity: Option<&str>,
        exclude: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        if let Some(v) = affinity {
            if let Some(ep) = endpoints
                .iter()
                .find(|e| Some(**e) != exclude && affinity_value(e) == v)
            {
                return Some(*ep);
            }
        }
        let skip = exclude.and_then(|x| endpoints.iter().position(|e| *e == x));
        let count = endpoints.len() - usize::from(skip.is_some());
        match count {
            0 => return None,
            // One choice: no position to keep, and no lock shared by all workers to take for it.
            1 => return endpoints.iter().copied().find(|e| Some(*e) != exclude),
            _ => {}
        }
        let key = backend as *const Backend as usize;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.len() >= MAX_POSITIONS && !next.contains_key(&key) {
            next.clear();
        }
        let i = next.entry(key).or_insert(0);
        let mut at = *i % count;
        *i = i.wrapping_add(1);
        if skip.is_some_and(|s| at >= s) {
            at += 1;
        }
        Some(endpoints[at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps() -> Vec<SocketAddr> {
        vec![
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        ]
    }

    #[test]
    fn round_robin_affinity_and_exclusion() {
        let b = Balancer::default();
        let e = eps();
        let backend = Backend {
            service: crate::model::ServiceKey::new("ns", "svc"),
            port: "80".into(),
            upstream: super::super::routes::Upstream::Endpoints(e.clone()),
        };
        let svc = &backend;
        let picks: Vec<SocketAddr> = (0..6).map(|_| b.pick(svc, &e, None, None).unwrap()).collect();
        assert_eq!(picks[..3], e[..]);
        assert_eq!(picks[3..], e[..]);
        let pinned = affinity_value(&e[2]);
        for _ in 0..5 {
            assert_eq!(b.pick(svc, &e, Some(&pinned), None), Some(e[2]));
        }
        assert_eq!(b.pick(svc, &e, Some("stale"), None).map(|a| e.contains(&a)), Some(true));
        assert_ne!(
            b.pick(svc, &e, Some(&pinned), Some(e[2])),
            Some(e[2]),
            "a failed endpoint is not retried"
        );
        assert_eq!(b.pick(svc, &e[..1], None, Some(e[0])), None);
        let others: Vec<SocketAddr> = (0..4).filter_map(|_| b.pick(svc, &e, None, Some(e[1]))).collect();
        assert!(others.iter().all(|a| *a != e[1]) && others.contains(&e[0]) && others.contains(&e[2]));
        assert_eq!(b.pick(svc, &[], None, None), None);
    }

    #[test]
    fn one_endpoint_is_picked_without_a_position_and_never_when_excluded() {
        let b = Balancer::default();
        let one: Vec<SocketAddr> = eps()[..1].to_vec();
        let backend = Backend {
            service: crate::model::ServiceKey::new("ns", "svc"),
            port: "80".into(),
            upstream: super::super::routes::Upstream::Endpoints(one.clone()),
        };
        for _ in 0..3 {
            assert_eq!(b.pick(&backend, &one, None, None), Some(one[0]));
        }
        assert_eq!(b.pick(&backend, &one, None, Some(one[0])), None);
        // Of two, the one not excluded, every time.
        let two: Vec<SocketAddr> = eps()[..2].to_vec();
        for _ in 0..3 {
            assert_eq!(b.pick(&backend, &two, None, Some(two[0])), Some(two[1]));
        }
        assert!(b.next.lock().unwrap().is_empty(), "no round-robin position was kept");
    }

    #[test]
    fn canary_header_then_weight() {
        let b = Balancer::default();
        let c = |weight| Canary {
            weight,
            header: Some("x".into()),
        };
        assert!(b.use_canary(&c(0), Some("always")));
        assert!(!b.use_canary(&c(100), Some("never")));
        assert!((0..100).all(|_| b.use_canary(&c(100), None)));
        assert!((0..100).all(|_| !b.use_canary(&c(0), Some("other"))));
        let hits = (0..10_000).filter(|_| b.use_canary(&c(30), None)).count();
        assert!((2_500..3_500).contains(&hits), "{hits}");
    }
}
