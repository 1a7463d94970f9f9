//! Gateway API objects from the Kubernetes API: kube-rs watchers on GatewayClasses, Gateways,
//! HTTPRoutes and ReferenceGrants (and Namespaces, for `allowedRoutes` selectors).
//!
//! A kind whose CRD is not installed answers 404: that is no error. The kind counts as listed
//! with no objects (so the rest of kproxy, and the other Gateway kinds, carry on), and its
//! watcher keeps trying every few seconds, so that installing the CRDs later needs no restart.
//! As for the other kinds, each list is applied whole, never half-listed.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::objects::GatewayObject;
use super::types::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};
use crate::sync::SharedState;

/// Retry bounds for a watcher (a missing CRD is looked for again at most this often).
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Doubling retry delays from [`RETRY_MIN`] to [`RETRY_MAX`]; reset after a success.
struct Retry(Duration);

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = RETRY_MIN;
    }
}

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
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .backoff(Retry(RETRY_MIN))
        .boxed();
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
            }
            Some(Err(e)) => tracing::warn!(?kind, error = %e, "watch failed; retrying"),
        }
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
