//! Ingress status: one kproxy, elected with a coordination.k8s.io Lease, writes
//! `status.loadBalancer.ingress` of the Ingresses kproxy serves (and, through
//! [`super::gateway::writer`], the status of the Gateway API objects kproxy claims) (every node serves them the
//! same way, so one writer is enough, and many would fight). When an Ingress it wrote stops
//! being served (its class moved to another controller), the leader removes the address it
//! wrote, unless someone else already changed it. On shutdown the leader releases the Lease so
//! that another node takes over at once rather than after the Lease expires; statuses stay, as
//! the other nodes still serve them.
//!
//! The election is the client-go leaderelection protocol reduced to what one writer needs:
//! hold the Lease by renewing `renewTime` well within `leaseDurationSeconds`; take it over when
//! its holder has not renewed for a whole duration. Writes use the Lease's resourceVersion, so
//! two candidates racing for an expired Lease cannot both win.

use std::collections::{BTreeMap, BTreeSet};
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

use super::objects::ObjectKey;
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

/// PURE: the Lease that hands leadership back (client-go's release on cancel): no holder and a
/// one-second duration, so any candidate takes it at its next try. `None` unless `me` holds it.
pub fn plan_release(current: &Lease, me: &str, now_ms: i64) -> Option<Lease> {
    let spec = current.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(me) {
        return None;
    }
    let mut released = current.clone();
    released.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: micro(now_ms),
        renew_time: micro(now_ms),
        lease_transitions: spec.lease_transitions,
        ..LeaseSpec::default()
    });
    Some(released)
}

/// What the leader writes.
#[derive(Debug, Default, PartialEq)]
pub struct StatusPlan {
    /// Served Ingresses whose status is not yet the entry.
    pub write: Vec<ObjectKey>,
    /// Ingresses this leader wrote that are no longer served and still show the entry.
    pub clear: Vec<ObjectKey>,
}

/// PURE: which statuses to write and to clear. `current` is each Ingress's
/// `status.loadBalancer.ingress` as JSON (`None` when absent); `written` the Ingresses this
/// leader set to `entry` and has not cleared since.
pub fn plan_statuses(
    served: &[String],
    current: &BTreeMap<ObjectKey, Option<serde_json::Value>>,
    entry: &serde_json::Value,
    written: &BTreeSet<ObjectKey>,
) -> StatusPlan {
    let want = json!([entry]);
    let served: BTreeSet<ObjectKey> = served
        .iter()
        .filter_map(|key| key.split_once('/'))
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .collect();
    let write = served
        .iter()
        .filter(|key| current.contains_key(*key) && current.get(*key).cloned().flatten().as_ref() != Some(&want))
        .cloned()
        .collect();
    let clear = written
        .iter()
        .filter(|key| !served.contains(*key))
        .filter(|key| current.get(*key).cloned().flatten().as_ref() == Some(&want))
        .cloned()
        .collect();
    StatusPlan { write, clear }
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

/// Brings statuses in line with [`plan_statuses`], remembering in `written` what it set.
async fn write_statuses(
    client: &Client,
    state: &SharedState,
    table: &RouteTable,
    entry: &serde_json::Value,
    written: &mut BTreeSet<ObjectKey>,
) {
    let current: BTreeMap<ObjectKey, Option<serde_json::Value>> = state.read(|_, objects| {
        objects
            .ingresses
            .iter()
            .map(|(key, i)| {
                let lb = i.status.as_ref().and_then(|s| s.load_balancer.as_ref());
                let value = lb
                    .and_then(|lb| lb.ingress.as_ref())
                    .and_then(|v| serde_json::to_value(v).ok());
                (key.clone(), value)
            })
            .collect()
    });
    let plan = plan_statuses(&table.ingresses, &current, entry, written);
    for (key, ingress) in plan
        .write
        .into_iter()
        .map(|k| (k, Some(entry)))
        .chain(plan.clear.into_iter().map(|k| (k, None)))
    {
        let (ns, name) = &key;
        let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
        let patch = match ingress {
            Some(entry) => json!({ "status": { "loadBalancer": { "ingress": [entry] } } }),
            None => json!({ "status": { "loadBalancer": { "ingress": null } } }),
        };
        let what = if ingress.is_some() {
            "updated"
        } else {
            "cleared (no longer served)"
        };
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(ingress = %format!("{ns}/{name}"), address = %entry, "Ingress status {what}");
                if ingress.is_some() {
                    written.insert(key);
                } else {
                    written.remove(&key);
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                written.remove(&key);
            }
            Err(e) => tracing::warn!(ingress = %format!("{ns}/{name}"), error = %e, "updating Ingress status failed"),
        }
    }
}

/// Hands the Lease back if this kproxy holds it.
async fn release(leases: &Api<Lease>, cfg: &StatusConfig) {
    let Ok(Some(current)) = leases.get_opt(LEASE_NAME).await else {
        return;
    };
    let Some(released) = plan_release(&current, &cfg.identity, Timestamp::now().as_millisecond()) else {
        return;
    };
    match leases.replace(LEASE_NAME, &PostParams::default(), &released).await {
        Ok(_) => tracing::info!(identity = %cfg.identity, "Ingress status Lease released"),
        Err(e) => tracing::warn!(error = %e, "releasing the Ingress status Lease failed"),
    }
}

/// Runs the election and, while leader, keeps the Ingresses' status current; on shutdown
/// releases the Lease if held.
pub async fn run(
    client: Client,
    cfg: StatusConfig,
    state: Arc<SharedState>,
    mut routes: watch::Receiver<Option<Arc<RouteTable>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut leader = false;
    let mut written = BTreeSet::new();
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
            // What another leader wrote meanwhile is theirs to clear.
            written.clear();
        }
        let table = routes.borrow_and_update().clone();
        if let (true, Some(table)) = (leader, table) {
            let address = cfg
                .address
                .clone()
                .or_else(|| state.read(|store, _| store.node().addresses.first().map(|a| a.to_string())));
            match &address {
                Some(a) => write_statuses(&client, &state, &table, &load_balancer_entry(a), &mut written).await,
                None => tracing::debug!("no address to write in Ingress status (set --ingress-status-address)"),
            }
            // The same leader writes the Gateway API statuses.
            super::gateway::writer::write_statuses(&client, &state, &table.gateway_status, address.as_deref()).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
            r = routes.changed() => if r.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    if leader {
        release(&leases, &cfg).await;
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
    fn release_hands_the_lease_back_only_when_held() {
        let held = lease("a", 1_000);
        let released = plan_release(&held, "a", 9_000).expect("held by a");
        let given_back = released.spec.unwrap();
        assert_eq!(given_back.holder_identity, None);
        assert_eq!(given_back.lease_duration_seconds, Some(1));
        assert_eq!(released.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(plan_release(&held, "b", 9_000), None, "not b's to release");
        let released = plan_release(&held, "a", 9_000).unwrap();
        let taken = plan_lease(Some(&released), "b", 9_500, "kube-system");
        assert_eq!(
            spec(&taken).holder_identity.as_deref(),
            Some("b"),
            "taken at once, long before the old 15 s would expire"
        );
    }

    #[test]
    fn statuses_are_written_for_served_ingresses_and_cleared_when_no_longer_served() {
        let entry = load_balancer_entry("203.0.113.7");
        let key = |n: &str| ("ns".to_string(), n.to_string());
        let mine = Some(json!([entry]));
        let current = BTreeMap::from([
            (key("new"), None),
            (key("done"), mine.clone()),
            (key("left"), mine.clone()),
            (key("retaken"), Some(json!([{"ip": "198.51.100.1"}]))),
            (key("foreign"), mine.clone()),
        ]);
        let served = vec!["ns/new".to_string(), "ns/done".to_string(), "ns/gone".to_string()];
        let written = BTreeSet::from([key("done"), key("left"), key("retaken")]);
        let plan = plan_statuses(&served, &current, &entry, &written);
        assert_eq!(plan.write, [key("new")], "deleted Ingresses are not written");
        assert_eq!(
            plan.clear,
            [key("left")],
            "only what this leader wrote, and only while it still shows the entry"
        );
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
