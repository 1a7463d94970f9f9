//! Gateway API objects from the Kubernetes API: kube-rs watchers on GatewayClasses, Gateways,
//! HTTPRoutes and ReferenceGrants (and Namespaces, for `allowedRoutes` selectors).
//!
//! A kind whose CRD is not installed answers 404: that is no error. The kind counts as listed
//! with no objects (so the rest of kproxy, and the other Gateway kinds, carry on), and its
//! watcher looks for it again, backing off to one list every [`MISSING_CAP`] at most, so that
//! installing the CRDs later needs no restart while a cluster without them (most clusters) is
//! not asked four times a second by every node.
//! As for the other kinds, each list is applied whole, never half-listed.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::objects::GatewayObject;
use super::types::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};
use crate::sync::SharedState;
use crate::watch::backoff::WatchBackoff;

/// How long a kind whose CRD is missing may wait for its next look: CRDs installed later are
/// picked up within this, and 5,000 nodes without them send about 2,700 cheap 404 lists a
/// second (four kinds, at a mean of 3/4 of the cap) instead of a steady 40,000.
const MISSING_CAP: Duration = Duration::from_secs(10);

fn not_installed(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// Feeds one kind into the Gateway objects until shutdown.
async fn watch_kind<K>(api: Api<K>, state: Arc<SharedState>, mut shutdown: watch::Receiver<bool>)
where
    K: GatewayObject + Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::KIND;
    // The retries are paced here, not by kube-rs's `backoff()`: its reset after every event
    // (the watcher emits `Init` before each failing list) kept a missing CRD at the first step.
    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    let mut failures = WatchBackoff::new();
    let mut absent = WatchBackoff::with_cap(MISSING_CAP);
    let mut buffer: Vec<K> = Vec::new();
    let mut missing = false;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            None => return,
            Some(Ok(Event::Init)) => buffer.clear(),
            Some(Ok(Event::InitApply(obj))) => buffer.push(obj),
            Some(Ok(Event::InitDone)) => {
                let all = std::mem::take(&mut buffer);
                if std::mem::take(&mut missing) {
                    tracing::info!(?kind, objects = all.len(), "Gateway API kind installed; listed");
                } else {
                    tracing::debug!(?kind, objects = all.len(), "listed");
                }
                state.update_ingress(|o| K::replace(&mut o.gateway, &all));
            }
            Some(Ok(Event::Apply(obj))) => state.update_ingress(|o| K::apply(&mut o.gateway, &obj)),
            Some(Ok(Event::Delete(obj))) => state.update_ingress(|o| K::delete(&mut o.gateway, &obj)),
            Some(Err(e)) if not_installed(&e) => {
                if !missing {
                    tracing::info!(
                        ?kind,
                        "Gateway API CRD not installed: serving none of this kind, watching for it"
                    );
                    missing = true;
                }
                state.update_ingress(|o| o.gateway.mark_absent(kind));
                if pause(absent.next(), &mut shutdown).await {
                    return;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(?kind, error = %e, "watch failed; retrying");
                if pause(failures.next(), &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Waits `delay` before the watcher's next attempt; whether shutdown came first.
async fn pause(delay: Option<Duration>, shutdown: &mut watch::Receiver<bool>) -> bool {
    let delay = delay.unwrap_or(MISSING_CAP);
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = shutdown.changed() => true,
    }
}

/// Starts the Gateway API watchers; they run until `shutdown`.
pub fn spawn_watchers(
    client: Client,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(watch_kind::<GatewayClass>(
            Api::all(client.clone()),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<Gateway>(
            Api::all(client.clone()),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<HttpRoute>(
            Api::all(client.clone()),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<ReferenceGrant>(
            Api::all(client.clone()),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<Namespace>(Api::all(client), state, shutdown)),
    ]
}
