//! Cluster IPs and node ports for Services from manifest files, given as the API server would:
//! deterministically (a hash of the Service's name picks the start, collisions move to the next
//! free value), and never changed while the Service exists.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use sha2::{Digest, Sha256};

/// `namespace/name` of a Service.
pub type ServiceId = (String, String);

/// Which Service (an unset namespace is `default`, as kubectl applies it).
pub fn id_of(svc: &Service) -> ServiceId {
    (
        svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// What a Service ended up with: its cluster IP and each port's node port (0 for none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    pub ip: Option<IpAddr>,
    pub node_ports: Vec<i32>,
}

impl Assigned {
    pub fn of(svc: &Service) -> Assigned {
        let spec = svc.spec.as_ref();
        Assigned {
            ip: spec.and_then(|s| s.cluster_ip.as_ref()).and_then(|ip| ip.parse().ok()),
            node_ports: spec
                .and_then(|s| s.ports.as_ref())
                .map(|ports| ports.iter().map(|p| p.node_port.unwrap_or(0)).collect())
                .unwrap_or_default(),
        }
    }
}

/// Addresses and node ports in use.
#[derive(Debug, Default)]
pub struct Taken {
    ips: BTreeSet<IpAddr>,
    ports: BTreeSet<i32>,
}

impl Taken {
    pub fn add(&mut self, a: &Assigned) {
        self.ips.extend(a.ip);
        self.ports.extend(a.node_ports.iter().copied().filter(|p| *p != 0));
    }
}

/// Gives `services` without a cluster IP one from `range`, and NodePort/LoadBalancer ports
/// without a node port one from 30000-32767, avoiding what is `taken` (by other Services) and
/// what these Services set themselves. A Service found in `previous` gets back what it had, if
/// still free, so that editing a file never moves a Service's cluster IP.
pub fn allocate(services: &mut [Service], range: &IpNet, taken: &mut Taken, previous: &BTreeMap<ServiceId, Assigned>) {
    for svc in services.iter() {
        taken.add(&Assigned::of(svc));
    }
    // Sorted by name so the allocation does not depend on file order.
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|i| id_of(&services[*i]));
    for i in order {
        let svc = &mut services[i];
        let id = id_of(svc);
        let key = format!("{}/{}", id.0, id.1);
        let before = previous.get(&id);
        let Some(spec) = svc.spec.as_mut() else {
            continue;
        };
        let svc_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        if svc_type == "ExternalName" {
            continue;
        }
        if spec.cluster_ip.as_deref().unwrap_or_default().is_empty() && spec.cluster_ips.is_none() {
            let kept = before
                .and_then(|b| b.ip)
                .filter(|ip| range.contains(ip) && !taken.ips.contains(ip));
            if let Some(ip) = kept.or_else(|| pick_ip(range, &key, &taken.ips)) {
                if kept.is_none() {
                    tracing::info!(service = %key, %ip, "allocated cluster IP");
                }
                taken.ips.insert(ip);
                spec.cluster_ip = Some(ip.to_string());
            }
        }
        if matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
            for (n, port) in spec.ports.iter_mut().flatten().enumerate() {
                if port.node_port.unwrap_or(0) == 0 {
                    let kept = before
                        .and_then(|b| b.node_ports.get(n).copied())
                        .filter(|p| *p != 0 && !taken.ports.contains(p));
                    let np = kept.unwrap_or_else(|| pick_node_port(&format!("{key}#{n}"), &taken.ports));
                    if kept.is_none() {
                        tracing::info!(service = %key, node_port = np, "allocated node port");
                    }
                    taken.ports.insert(np);
                    port.node_port = Some(np);
                }
            }
        }
    }
}

fn hash64(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn pick_ip(range: &IpNet, key: &str, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let hosts: Vec<IpAddr> = match range {
        // The first address is the network and the second is kept for `kubernetes.default`.
        IpNet::V4(n) => {
            let size = 1u64 << (32 - n.prefix_len());
            if size < 4 {
                return None;
            }
            let base = u32::from(n.network()) as u64;
            let start = hash64(key) % (size - 3);
            return (0..size - 3)
                .map(|i| IpAddr::from(std::net::Ipv4Addr::from((base + 2 + (start + i) % (size - 3)) as u32)))
                .find(|ip| !used.contains(ip));
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network());
            let span = 1u128 << (128 - n.prefix_len()).min(64);
            let start = u128::from(hash64(key)) % (span - 3);
            (0..1024u128)
                .map(|i| IpAddr::from(std::net::Ipv6Addr::from(base + 2 + (start + i) % (span - 3))))
                .collect()
        }
    };
    hosts.into_iter().find(|ip| !used.contains(ip))
}

fn pick_node_port(key: &str, used: &BTreeSet<i32>) -> i32 {
    const LOW: i32 = 30000;
    const SIZE: i32 = 2768;
    let start = (hash64(key) % SIZE as u64) as i32;
    (0..SIZE)
        .map(|i| LOW + (start + i) % SIZE)
        .find(|p| !used.contains(p))
        .unwrap_or(LOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, spec: &str) -> Service {
        serde_yaml::from_str(&format!("metadata: {{name: {name}, namespace: ns}}\nspec: {spec}")).unwrap()
    }

    #[test]
    fn allocation_is_deterministic_avoids_what_is_taken_and_keeps_what_was_given() {
        let range: IpNet = "10.96.0.0/12".parse().unwrap();
        let fresh = || {
            vec![
                svc("a", "{ports: [{port: 80}]}"),
                svc("b", "{type: NodePort, ports: [{port: 80}]}"),
            ]
        };
        let mut first = fresh();
        allocate(&mut first, &range, &mut Taken::default(), &BTreeMap::new());
        let mut again = fresh();
        allocate(&mut again, &range, &mut Taken::default(), &BTreeMap::new());
        assert_eq!(first, again, "same names, same answers");
        let a = Assigned::of(&first[0]);
        let b = Assigned::of(&first[1]);
        assert!(range.contains(&a.ip.unwrap()));
        assert!((30000..32768).contains(&b.node_ports[0]));

        // What another Service holds is avoided.
        let mut taken = Taken::default();
        taken.add(&a);
        let mut other = vec![svc("a", "{ports: [{port: 80}]}")];
        allocate(&mut other, &range, &mut taken, &BTreeMap::new());
        assert_ne!(Assigned::of(&other[0]).ip, a.ip);

        // A Service seen before gets its values back, even where the hash would point elsewhere.
        let previous = BTreeMap::from([(
            ("ns".to_string(), "b".to_string()),
            Assigned {
                ip: Some("10.96.7.7".parse().unwrap()),
                node_ports: vec![31999],
            },
        )]);
        let mut edited = vec![svc("b", "{type: NodePort, ports: [{port: 8080}]}")];
        allocate(&mut edited, &range, &mut Taken::default(), &previous);
        assert_eq!(Assigned::of(&edited[0]), previous[&("ns".to_string(), "b".to_string())]);
    }
}
