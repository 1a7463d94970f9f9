//! Ingress status: one kproxy, elected with a coordination.k8s.io Lease, writes
//! `status.loadBalancer.ingress` of the Ingresses kproxy serves (every node serves them the
//! same way, so one writer is enough, and many would fight).
//!
//! The election is the client-go leaderelection protocol reduced to what one writer needs:
//! hold the Lease by renewing `renewTime` well within `leaseDurationSeconds`; take it over when
//! its holder has not renewed for a whole duration. Writes use the Lease's resourceVersion, so
//! two candidates racing for an expired Lease cannot both win.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::routes::RouteTable;
use crate::sync::SharedState;

pub const LEASE_NAME: &str = "kproxy-ingress-status";
/// How long a Lease stays valid without renewal (client-go's default).
pub const LEASE_DURATION_SECONDS: i32 = 15;
/// How often the Lease is renewed or tried, and statuses checked.
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// What a candidate does with the Lease it read.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    /// No Lease yet: create this one.
    Create(Lease),
    /// Ours (renew) or expired (take over): replace it with this one, conditional on its resourceVersion.
    Replace(Lease),
    /// Someone else holds a valid Lease.
    Follow { holder: String },
}

fn micro(ms: i64) -> Option<MicroTime> {
    Timestamp::from_millisecond(ms).ok().map(MicroTime)
}

/// PURE: the decision of candidate `me` at `now_ms` (Unix milliseconds) given the Lease read.
pub fn plan_lease(current: Option<&Lease>, me: &str, now_ms: i64, namespace: &str) -> LeaseDecision {
    let fresh_spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        acquire_time: micro(now_ms),
        renew_time: micro(now_ms),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(lease) = current else {
        return LeaseDecision::Create(Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(fresh_spec(0)),
        });
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mut next = lease.clone();
    if holder == me {
        let mut renewed = spec;
        renewed.renew_time = micro(now_ms);
        renewed.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
        next.spec = Some(renewed);
        return LeaseDecision::Replace(next);
    }
    let renewed_ms = spec.renew_time.as_ref().map_or(0, |t| t.0.as_millisecond());
    let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_DURATION_SECONDS)) * 1000;
    if holder.is_empty() || renewed_ms + duration_ms < now_ms {
        next.spec = Some(fresh_spec(spec.lease_transitions.unwrap_or(0) + 1));
        return LeaseDecision::Replace(next);
    }
    LeaseDecision::Follow { holder }
}

/// PURE: the `status.loadBalancer.ingress` entry for an address (an IP, else a hostname).
pub fn load_balancer_entry(address: &str) -> serde_json::Value {
    match address.parse::<IpAddr>() {
        Ok(ip) => json!({ "ip": ip.to_string() }),
        Err(_) => json!({ "hostname": address }),
    }
}

/// Who writes status, and what address it writes.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// `--ingress-status-address`; without it, this node's first address.
    pub address: Option<String>,
    /// The Lease's namespace (kproxy's own: `$POD_NAMESPACE`, else kube-system).
    pub namespace: String,
    /// This candidate's identity (the node name).
    pub identity: String,
}

/// Tries once to hold the Lease; true while this kproxy is the leader.
async fn elect(leases: &Api<Lease>, cfg: &StatusConfig) -> Result<bool, kube::Error> {
    let current = leases.get_opt(LEASE_NAME).await?;
    let now = Timestamp::now().as_millisecond();
    match plan_lease(current.as_ref(), &cfg.identity, now, &cfg.namespace) {
        LeaseDecision::Create(lease) => leases.create(&PostParams::default(), &lease).await.map(|_| true),
        LeaseDecision::Replace(lease) => leases
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .map(|_| true),
        LeaseDecision::Follow { holder } => {
            tracing::trace!(%holder, "Ingress status is written by another kproxy");
            Ok(false)
        }
    }
}

/// Writes the status of every served Ingress whose status differs from `entry`.
async fn write_statuses(client: &Client, state: &SharedState, table: &RouteTable, entry: &serde_json::Value) {
    let stale: Vec<(String, String)> = state.read(|_, objects| {
        table
            .ingresses
            .iter()
            .filter_map(|key| key.split_once('/'))
            .filter(|(ns, name)| {
                let current = objects
                    .ingresses
                    .get(&(ns.to_string(), name.to_string()))
                    .and_then(|i: &Ingress| i.status.as_ref())
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| serde_json::to_value(lb.ingress.clone().unwrap_or_default()).ok());
                current != Some(json!([entry]))
            })
            .map(|(ns, name)| (ns.to_string(), name.to_string()))
            .collect()
    });
    for (ns, name) in stale {
        let api: Api<Ingress> = Api::namespaced(client.clone(), &ns);
        let patch = json!({ "status": { "loadBalancer": { "ingress": [entry] } } });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => tracing::info!(ingress = %format!("{ns}/{name}"), address = %entry, "Ingress status updated"),
            Err(e) => tracing::warn!(ingress = %format!("{ns}/{name}"), error = %e, "updating Ingress status failed"),
        }
    }
}

/// Runs the election and, while leader, keeps the served Ingresses' status current.
pub async fn run(
    client: Client,
    cfg: StatusConfig,
    state: Arc<SharedState>,
    mut routes: watch::Receiver<Option<Arc<RouteTable>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut leader = false;
    loop {
        let now_leader = match elect(&leases, &cfg).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "Ingress status Lease not held");
                false
            }
        };
        if now_leader != leader {
            tracing::info!(identity = %cfg.identity, leader = now_leader, "Ingress status leadership changed");
            leader = now_leader;
        }
        let table = routes.borrow_and_update().clone();
        if let (true, Some(table)) = (leader, table) {
            let address = cfg
                .address
                .clone()
                .or_else(|| state.read(|store, _| store.node().addresses.first().map(|a| a.to_string())));
            match address {
                Some(a) => write_statuses(&client, &state, &table, &load_balancer_entry(&a)).await,
                None => tracing::debug!("no address to write in Ingress status (set --ingress-status-address)"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
            r = routes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_ms: i64) -> Lease {
        let LeaseDecision::Create(mut l) = plan_lease(None, holder, renewed_ms, "kube-system") else {
            panic!("no lease: create");
        };
        l.metadata.resource_version = Some("7".into());
        l
    }

    fn spec(d: &LeaseDecision) -> LeaseSpec {
        match d {
            LeaseDecision::Create(l) | LeaseDecision::Replace(l) => l.spec.clone().unwrap(),
            LeaseDecision::Follow { .. } => panic!("follow"),
        }
    }

    #[test]
    fn lease_is_created_renewed_respected_and_taken_over_when_expired() {
        let first = plan_lease(None, "a", 1_000, "kube-system");
        assert!(matches!(first, LeaseDecision::Create(_)));
        assert_eq!(spec(&first).holder_identity.as_deref(), Some("a"));

        let held = lease("a", 1_000);
        let renew = plan_lease(Some(&held), "a", 5_000, "kube-system");
        let LeaseDecision::Replace(ref l) = renew else {
            panic!("renew")
        };
        assert_eq!(
            l.metadata.resource_version.as_deref(),
            Some("7"),
            "conditional on what was read"
        );
        assert_eq!(spec(&renew).renew_time.unwrap().0.as_millisecond(), 5_000);
        assert_eq!(spec(&renew).acquire_time.unwrap().0.as_millisecond(), 1_000);

        assert_eq!(
            plan_lease(Some(&held), "b", 1_000 + 14_000, "kube-system"),
            LeaseDecision::Follow { holder: "a".into() }
        );
        let take = plan_lease(Some(&held), "b", 1_000 + 16_000, "kube-system");
        assert_eq!(spec(&take).holder_identity.as_deref(), Some("b"));
        assert_eq!(spec(&take).lease_transitions, Some(1));
    }

    #[test]
    fn status_entry_is_ip_or_hostname() {
        assert_eq!(load_balancer_entry("192.0.2.1"), json!({"ip": "192.0.2.1"}));
        assert_eq!(
            load_balancer_entry("lb.example.com"),
            json!({"hostname": "lb.example.com"})
        );
    }
}
