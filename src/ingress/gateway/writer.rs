//! The status writer of the elected kproxy (the holder of the Ingress status Lease): brings
//! GatewayClasses, Gateways and HTTPRoutes in line with [`plan_status_writes`]. Each write is
//! a merge patch of the status subresource conditional on the resourceVersion it was planned
//! from; one that lost a race (409) is planned again at the next round, from the new object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::status::{plan_status_writes, Kind, StatusReport, StatusWrite};
use super::types::{Gateway, GatewayClass, HttpRoute};
use crate::sync::SharedState;

async fn write_one(client: &Client, w: &StatusWrite) -> Result<(), kube::Error> {
    let params = PatchParams::default();
    let patch = Patch::Merge(&w.patch);
    let (ns, name) = (&w.key.0, &w.key.1);
    match w.kind {
        Kind::GatewayClass => Api::<GatewayClass>::all(client.clone())
            .patch_status(name, &params, &patch)
            .await
            .map(drop),
        Kind::Gateway => Api::<Gateway>::namespaced(client.clone(), ns)
            .patch_status(name, &params, &patch)
            .await
            .map(drop),
        Kind::HttpRoute => Api::<HttpRoute>::namespaced(client.clone(), ns)
            .patch_status(name, &params, &patch)
            .await
            .map(drop),
    }
}

/// Writes every status that differs from `report` (with `address` in Gateways' addresses).
pub async fn write_statuses(client: &Client, state: &SharedState, report: &StatusReport, address: Option<&str>) {
    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()));
    let writes = state.read(|_, objects| plan_status_writes(report, &objects.gateway, address, &now));
    if writes.is_empty() {
        return;
    }
    let mut written = 0;
    for w in &writes {
        let what = format!(
            "{:?} {}",
            w.kind,
            if w.key.0.is_empty() {
                w.key.1.clone()
            } else {
                format!("{}/{}", w.key.0, w.key.1)
            }
        );
        match write_one(client, w).await {
            Ok(()) => {
                written += 1;
                tracing::debug!(object = %what, "Gateway API status written");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(object = %what, "changed meanwhile; its status is written at the next round")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(object = %what, error = %e, "writing Gateway API status failed"),
        }
    }
    tracing::info!(written, planned = writes.len(), "Gateway API statuses written");
}
