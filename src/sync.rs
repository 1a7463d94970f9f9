//! The sync loop: batches changes, bounds how often the dataplane is programmed, resyncs
//! periodically, retries with backoff after a failure. Never two syncs at once (one task).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::dataplane::{Dataplane, DataplaneError};
use crate::health::ProxyHealth;
use crate::healthcheck::HealthCheckServer;
use crate::ingress::objects::IngressObjects;
use crate::metrics::metrics;
use crate::model::store::{Snapshot, Store};

/// The store shared by the sources (writers) and the sync loop (reader).
pub struct SharedState {
    store: Mutex<Store>,
    notify: Notify,
    health: Arc<ProxyHealth>,
    /// Ingress, IngressClass and TLS Secret objects: kept apart from `store` so that their
    /// changes never wake the sync loop (they need no kernel rules).
    ingress: Mutex<IngressObjects>,
    /// Bumped on every change of either, for the Ingress route builder.
    generation: watch::Sender<u64>,
}

impl SharedState {
    pub fn new(store: Store, health: Arc<ProxyHealth>) -> Arc<Self> {
        Arc::new(SharedState {
            store: Mutex::new(store),
            notify: Notify::new(),
            health,
            ingress: Mutex::new(IngressObjects::default()),
            generation: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves a store that is still structurally valid.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the store and wakes the sync loop. `f` returns whether anything changed.
    pub fn update(&self, f: impl FnOnce(&mut Store) -> bool) {
        let (changed, pending, eligible, became_ready) = {
            let mut store = self.lock();
            let was_ready = store.is_ready();
            let changed = f(&mut store);
            let became_ready = !was_ready && store.is_ready();
            (changed, store.pending_counts(), store.node_eligible(), became_ready)
        };
        // The last list can complete without changing anything (a Node equal to the default):
        // the route builder must still hear that everything is listed now.
        if changed || became_ready {
            self.generation.send_modify(|g| *g += 1);
        }
        if changed {
            self.health.queued_update();
            self.health.set_node_eligible(eligible);
            let m = metrics();
            m.set_last_queued(SystemTime::now());
            m.service_changes(pending.0, 0);
            m.endpoint_changes(pending.1, 0);
        }
        self.notify.notify_one();
    }

    /// Runs `f` on the Ingress objects; `f` returns whether anything changed. Never wakes the sync loop.
    pub fn update_ingress(&self, f: impl FnOnce(&mut IngressObjects) -> bool) {
        let changed = f(&mut self.ingress.lock().unwrap_or_else(PoisonError::into_inner));
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Reads the store and the Ingress objects together (the Ingress route builder).
    pub fn read<R>(&self, f: impl FnOnce(&Store, &IngressObjects) -> R) -> R {
        let store = self.lock();
        let ingress = self.ingress.lock().unwrap_or_else(PoisonError::into_inner);
        f(&store, &ingress)
    }

    /// Changes whenever the store or the Ingress objects change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether every source has listed completely.
    pub fn is_ready(&self) -> bool {
        self.lock().is_ready()
    }

    /// The complete desired state, once ready (for `kproxy render`).
    pub fn snapshot(&self) -> Option<crate::model::DesiredState> {
        self.take_snapshot(true).map(|s| s.desired)
    }

    fn take_snapshot(&self, force_full: bool) -> Option<Snapshot> {
        let mut store = self.lock();
        if !store.is_ready() {
            return None;
        }
        if force_full {
            store.force_full();
        }
        if !store.has_changes() {
            return None;
        }
        Some(store.snapshot())
    }

    fn force_full(&self) {
        self.lock().force_full();
    }
}

/// How often syncs may and must happen.
#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    /// At most one sync per this interval (`--min-sync-period`).
    pub min_interval: Duration,
    /// A full resync at least this often (`--sync-period`).
    pub sync_period: Duration,
    /// First retry delay after a failure; doubles up to `sync_period`.
    pub retry_initial: Duration,
}

/// Drives `dataplane` from `state` until `shutdown` turns true.
pub async fn run(
    state: Arc<SharedState>,
    mut dataplane: Box<dyn Dataplane>,
    timing: SyncTiming,
    mut health_checks: Option<HealthCheckServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mode = dataplane.mode();
    let mut last_sync: Option<Instant> = None;
    let mut last_full = Instant::now();
    let mut retry: Option<(Instant, Duration)> = None;
    loop {
        let now = Instant::now();
        let periodic_due = last_full + timing.sync_period;
        // After a failure nothing runs before the backoff expires, changes or not.
        let mut earliest = last_sync.map_or(now, |t| t + timing.min_interval);
        if let Some((at, _)) = retry {
            earliest = earliest.max(at);
        }
        // Wait for a change (then not before `earliest`), the periodic resync, or the retry.
        let wake_at = retry.map_or(periodic_due, |(at, _)| at);
        tokio::select! {
            _ = state.notify.notified() => {
                if Instant::now() < earliest {
                    // Batch: let more changes pile up until the minimum interval has passed.
                    tokio::select! {
                        _ = tokio::time::sleep_until(earliest) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = Instant::now();
        let periodic = now >= periodic_due;
        let retrying = retry.is_some_and(|(at, _)| now >= at);
        let Some(snapshot) = state.take_snapshot(periodic || retrying) else {
            if periodic {
                // Not ready yet: try the periodic sync again one period later.
                last_full = now;
            }
            continue;
        };
        let full = snapshot.changes.full;
        last_sync = Some(now);
        match sync_once(dataplane.as_mut(), &snapshot).await {
            Ok(()) => {
                state.health.updated();
                if let Some(hc) = health_checks.as_mut() {
                    hc.sync(&snapshot.desired).await;
                }
                if full {
                    last_full = now;
                }
                retry = None;
            }
            Err(err) => {
                metrics().inc_sync_failures(mode);
                if matches!(err, DataplaneError::Rejected { .. } | DataplaneError::Command { .. }) && mode == "iptables"
                {
                    metrics().inc_iptables_restore_failures();
                }
                state.force_full();
                // A missing tool or kernel feature will not fix itself in a second.
                let delay = if err.is_retryable() {
                    retry.map_or(timing.retry_initial, |(_, d)| (d * 2).min(timing.sync_period))
                } else {
                    timing.sync_period
                };
                tracing::error!(error = %err, retry_in = ?delay, "sync failed; the kernel keeps its previous rules");
                retry = Some((Instant::now() + delay, delay));
            }
        }
    }
}

/// One sync with its span, log line and metrics.
async fn sync_once(dataplane: &mut dyn Dataplane, snapshot: &Snapshot) -> Result<(), DataplaneError> {
    let full = snapshot.changes.full;
    let span = tracing::info_span!("sync", mode = dataplane.mode(), full);
    async {
        let started = Instant::now();
        let stats = dataplane.sync(&snapshot.desired, &snapshot.changes).await?;
        let took = started.elapsed();
        let done = SystemTime::now();
        let services = snapshot.desired.service_port_count();
        let endpoints = snapshot.desired.endpoint_count();
        let m = metrics();
        m.observe_sync(full, took);
        m.set_last_sync(done);
        m.set_programmed(services, endpoints);
        m.set_no_local_endpoints(stats.no_local_endpoints.0, stats.no_local_endpoints.1);
        m.service_changes(0, snapshot.service_changes as u64);
        m.endpoint_changes(0, snapshot.endpoint_changes as u64);
        if full {
            let get = |t: &str| stats.rules_total.iter().find(|(n, _)| *n == t).map_or(0, |(_, c)| *c);
            m.set_iptables_rules(get("filter"), get("nat"));
        }
        for t in &snapshot.trigger_times {
            if let Ok(latency) = done.duration_since(*t) {
                m.observe_network_programming(latency);
            }
        }
        tracing::info!(
            services,
            endpoints,
            changed = snapshot.changes.services.len(),
            rules = stats.rules_written,
            duration_ms = took.as_secs_f64() * 1000.0,
            "synced {} proxy rules",
            if full { "full" } else { "partial" }
        );
        Ok(())
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Result, SyncStats};
    use crate::model::{ChangeSet, DesiredState};
    use futures::future::BoxFuture;
    use k8s_openapi::api::core::v1::{Node, Service};

    /// (when, full, services) per sync.
    type SyncLog = Arc<Mutex<Vec<(Instant, bool, usize)>>>;

    /// Records syncs; fails the first `fail` of them.
    struct Recorder {
        log: SyncLog,
        fail: usize,
    }

    impl Dataplane for Recorder {
        fn mode(&self) -> &'static str {
            "test"
        }
        fn sync<'a>(
            &'a mut self,
            desired: &'a DesiredState,
            changes: &'a ChangeSet,
        ) -> BoxFuture<'a, Result<SyncStats>> {
            self.log
                .lock()
                .unwrap()
                .push((Instant::now(), changes.full, desired.services.len()));
            let fail = self.fail > 0;
            self.fail = self.fail.saturating_sub(1);
            Box::pin(async move {
                if fail {
                    Err(DataplaneError::Command {
                        command: "test".into(),
                        message: "boom".into(),
                    })
                } else {
                    Ok(SyncStats::default())
                }
            })
        }
        fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn svc(name: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn timing() -> SyncTiming {
        SyncTiming {
            min_interval: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            retry_initial: Duration::from_secs(1),
        }
    }

    fn start(fail: usize) -> (Arc<SharedState>, SyncLog, watch::Sender<bool>) {
        let state = SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))));
        let log = Arc::new(Mutex::new(vec![]));
        let (tx, rx) = watch::channel(false);
        let dp = Box::new(Recorder { log: log.clone(), fail });
        tokio::spawn(run(state.clone(), dp, timing(), None, rx));
        (state, log, tx)
    }

    fn make_ready(state: &SharedState) {
        state.update(|s| {
            s.replace_services([&svc("a")]);
            s.replace_slices([]);
            s.apply_node(&serde_yaml::from_str::<Node>("metadata: {name: n1}").unwrap())
        });
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_programmed_before_every_list_arrived() {
        let (state, log, _tx) = start(0);
        state.update(|s| s.replace_services([&svc("a")]));
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(log.lock().unwrap().is_empty());
        make_ready(&state);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ingress_changes_never_wake_the_sync_loop() {
        use crate::ingress::objects::IngressObject;
        use k8s_openapi::api::networking::v1::Ingress;
        let (state, log, _tx) = start(0);
        make_ready(&state);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut generation = state.subscribe();
        generation.borrow_and_update();
        for i in 0..5 {
            let ing: Ingress = serde_yaml::from_str(&format!("metadata: {{name: i{i}, namespace: ns}}")).unwrap();
            state.update_ingress(|o| Ingress::apply(o, &ing));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert!(generation.has_changed().unwrap(), "the route builder is told");
        assert_eq!(
            log.lock().unwrap().len(),
            1,
            "only the initial sync: no iptables work for Ingress"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_batched_by_min_interval() {
        let (state, log, _tx) = start(0);
        make_ready(&state);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t0 = log.lock().unwrap()[0].0;
        for i in 0..5 {
            state.update(|s| s.apply_service(&svc(&format!("b{i}"))));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 2, "five changes, one batched partial sync");
        assert!(!log[1].1, "partial");
        assert_eq!(log[1].2, 6);
        assert!(log[1].0 - t0 >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_full_resync() {
        let (state, log, _tx) = start(0);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|(_, full, _)| *full));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_retries_with_backoff_as_full_sync() {
        let (state, log, _tx) = start(3);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 4, "initial + 3 retries (1s, 2s, 4s) until success");
        assert!(log.iter().all(|(_, full, _)| *full));
        let gaps: Vec<u64> = log.windows(2).map(|w| (w[1].0 - w[0].0).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4]);
    }
}
