//! PURE: the statuses kproxy reports for GatewayClasses, Gateways and HTTPRoutes, and the
//! writes that bring the API objects in line with them.
//!
//! Conditions carry the object's `observedGeneration`; a condition's `lastTransitionTime`
//! changes only when its status does. Conditions of types kproxy does not set, and the
//! `status.parents` entries of other controllers, are written back untouched: kproxy never
//! fights another controller over what is not its own. An object whose status already says
//! what kproxy would write is not written at all, so a status write (which bumps the object's
//! resourceVersion and comes back as a watch event) settles after one round.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{json, Value};

use super::objects::GatewayObjects;
use super::types::{ParentRef, RouteGroupKind};
use super::{CONTROLLER_NAME, SUPPORTED_FEATURES};
use crate::ingress::objects::ObjectKey;

/// A condition as kproxy computes it (time and generation are added when written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, status: bool, reason: &str, message: &str) -> Cond {
        Cond {
            type_,
            status,
            reason: reason.to_string(),
            message: message.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassReport {
    pub name: String,
    pub generation: i64,
    pub conditions: Vec<Cond>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerReport {
    pub name: String,
    pub supported_kinds: Vec<RouteGroupKind>,
    pub attached: i32,
    pub conditions: Vec<Cond>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayReport {
    pub key: ObjectKey,
    pub generation: i64,
    /// Accepted, then Programmed.
    pub conditions: Vec<Cond>,
    pub listeners: Vec<ListenerReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParentReport {
    /// With group, kind and namespace filled in.
    pub parent_ref: ParentRef,
    pub conditions: Vec<Cond>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteReport {
    pub key: ObjectKey,
    pub generation: i64,
    pub parents: Vec<ParentReport>,
}

/// Everything kproxy reports, from one build of the route table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    /// False until every Gateway API kind is listed: nothing is reported before.
    pub ready: bool,
    pub classes: Vec<ClassReport>,
    pub gateways: Vec<GatewayReport>,
    pub routes: Vec<RouteReport>,
}

/// Which collection a status write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    GatewayClass,
    Gateway,
    HttpRoute,
}

/// One status write: a JSON merge patch for the `status` subresource, conditional on the
/// resourceVersion the status was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusWrite {
    pub kind: Kind,
    /// Namespace (empty for GatewayClasses) and name.
    pub key: ObjectKey,
    pub patch: Value,
}

fn to_condition(c: &Cond, generation: i64, previous: &[Condition], now: &Time) -> Condition {
    let status = if c.status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|p| p.type_ == c.type_ && p.status == status)
        .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
    Condition {
        type_: c.type_.to_string(),
        status: status.to_string(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}

/// kproxy's conditions, then the other types already there (kept as they are).
fn merge_conditions(ours: &[Cond], generation: i64, previous: &[Condition], now: &Time) -> Vec<Condition> {
    let mut out: Vec<Condition> = ours
        .iter()
        .map(|c| to_condition(c, generation, previous, now))
        .collect();
    out.extend(
        previous
            .iter()
            .filter(|p| ours.iter().all(|c| c.type_ != p.type_))
            .cloned(),
    );
    out
}

fn json_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The `status.addresses` entry for an address: an IP, else a hostname.
pub fn gateway_address(address: &str) -> Value {
    match address.parse::<IpAddr>() {
        Ok(ip) => json!({ "type": "IPAddress", "value": ip.to_string() }),
        Err(_) => json!({ "type": "Hostname", "value": address }),
    }
}

fn patch(resource_version: Option<&String>, status: Value) -> Value {
    json!({ "metadata": { "resourceVersion": resource_version }, "status": status })
}

/// PURE: the writes that make the objects' statuses say what `report` says. `address` is what
/// Gateways get in `status.addresses` (without one, they are not `Programmed`); `now` stamps
/// the conditions that change status.
pub fn plan_status_writes(
    report: &StatusReport,
    objects: &GatewayObjects,
    address: Option<&str>,
    now: &Time,
) -> Vec<StatusWrite> {
    let mut writes = Vec::new();
    if !report.ready {
        return writes;
    }
    for c in &report.classes {
        let Some(obj) = objects.classes.get(&c.name) else {
            continue;
        };
        let current = obj.status.clone().unwrap_or_default();
        let conditions = merge_conditions(&c.conditions, c.generation, &current.conditions, now);
        let features: Vec<Value> = SUPPORTED_FEATURES.iter().map(|f| json!({ "name": f })).collect();
        let desired = json!({ "conditions": json_of(&conditions), "supportedFeatures": features });
        let now_json = json!({
            "conditions": json_of(&current.conditions),
            "supportedFeatures": current.supported_features,
        });
        if desired != now_json {
            writes.push(StatusWrite {
                kind: Kind::GatewayClass,
                key: (String::new(), c.name.clone()),
                patch: patch(obj.metadata.resource_version.as_ref(), desired),
            });
        }
    }
    for g in &report.gateways {
        let Some(obj) = objects.gateways.get(&g.key) else {
            continue;
        };
        let current = obj.status.clone().unwrap_or_default();
        let mut ours = g.conditions.clone();
        if address.is_none() {
            if let Some(p) = ours.iter_mut().find(|c| c.type_ == "Programmed") {
                *p = Cond::new(
                    "Programmed",
                    false,
                    "AddressNotAssigned",
                    "no address to report: set --ingress-status-address or give the Node an address",
                );
            }
        }
        let conditions = merge_conditions(&ours, g.generation, &current.conditions, now);
        let listeners: Vec<Value> = g
            .listeners
            .iter()
            .map(|l| {
                let previous = current
                    .listeners
                    .iter()
                    .find(|p| p.name == l.name)
                    .map(|p| p.conditions.as_slice())
                    .unwrap_or_default();
                let conditions: Vec<Condition> = l
                    .conditions
                    .iter()
                    .map(|c| to_condition(c, g.generation, previous, now))
                    .collect();
                json!({
                    "name": l.name,
                    "supportedKinds": json_of(&l.supported_kinds),
                    "attachedRoutes": l.attached,
                    "conditions": json_of(&conditions),
                })
            })
            .collect();
        let addresses: Vec<Value> = address.map(gateway_address).into_iter().collect();
        let desired = json!({ "conditions": json_of(&conditions), "listeners": listeners, "addresses": addresses });
        if desired != json_of(&current) {
            writes.push(StatusWrite {
                kind: Kind::Gateway,
                key: g.key.clone(),
                patch: patch(obj.metadata.resource_version.as_ref(), desired),
            });
        }
    }
    let reports: BTreeMap<&ObjectKey, &RouteReport> = report.routes.iter().map(|r| (&r.key, r)).collect();
    for (key, obj) in &objects.routes {
        let current = obj.status.clone().unwrap_or_default().parents;
        let is_ours = |p: &Value| p.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME);
        if !reports.contains_key(key) && !current.iter().any(is_ours) {
            continue;
        }
        let mut parents: Vec<Value> = current.iter().filter(|p| !is_ours(p)).cloned().collect();
        for r in reports.get(key).map(|r| r.parents.as_slice()).unwrap_or_default() {
            let previous: Vec<Condition> = current
                .iter()
                .filter(|p| is_ours(p))
                .find(|p| {
                    p.get("parentRef")
                        .and_then(|v| serde_json::from_value::<ParentRef>(v.clone()).ok())
                        .is_some_and(|pr| pr == r.parent_ref)
                })
                .and_then(|p| p.get("conditions"))
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            let generation = reports[key].generation;
            let conditions: Vec<Condition> = r
                .conditions
                .iter()
                .map(|c| to_condition(c, generation, &previous, now))
                .collect();
            parents.push(json!({
                "parentRef": json_of(&r.parent_ref),
                "controllerName": CONTROLLER_NAME,
                "conditions": json_of(&conditions),
            }));
        }
        if parents != current {
            writes.push(StatusWrite {
                kind: Kind::HttpRoute,
                key: key.clone(),
                patch: patch(obj.metadata.resource_version.as_ref(), json!({ "parents": parents })),
            });
        }
    }
    writes
}
