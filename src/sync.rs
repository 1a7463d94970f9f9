//! The sync loop: batches changes, bounds how often the dataplane is programmed, resyncs
//! periodically, retries with backoff after a failure. Never two syncs at once (one task).

use std::collections::BTreeSet;
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
use crate::model::ServiceKey;

/// What hands the memory a full sync freed back to the kernel: set once at start by the
/// binary, which owns the allocator (`src/main.rs`); nothing when unset (tests, tools).
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs after every successful full sync to return freed memory to the kernel. A
/// full sync (above all the first, with the initial lists just converted) frees far more than
/// it keeps; the allocator returns a page only when the thread that owns it collects, and the
/// threads that did the work then mostly sit idle.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

fn release_memory() {
    if let Some(release) = RELEASE_MEMORY.get() {
        release();
    }
}

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
}

/// How often syncs may and must happen.
#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    /// At most one sync per this interval, measured from the start of the previous one
    /// (`--min-sync-period`): the first change after a quiet spell is programmed at once, a
    /// burst of changes in one batch per interval.
    pub min_interval: Duration,
    /// A full resync at least this often (`--sync-period`).
    pub sync_period: Duration,
    /// First retry delay after a failure; doubles up to `sync_period`.
    pub retry_initial: Duration,
}

/// When the runner must next do a full sync, and why.
#[derive(Debug, Clone, Copy)]
enum FullSync {
    /// The periodic resync, this long after the last successful full sync started.
    Periodic,
    /// A sync failed: a full one is owed, at `at`; `delay` is the backoff that led there.
    Retry { at: Instant, delay: Duration },
}

/// Drives `dataplane` from `state` until `shutdown` turns true.
///
/// A change is programmed as soon as the minimum interval allows, also while or right after a
/// long full sync ran (its snapshot was taken before the change, so the next sync carries it).
/// After a failure a full sync is retried with backoff; a dataplane that stays consistent when
/// a sync fails ([`Dataplane::partial_after_failure`]) keeps getting partial syncs for changes
/// meanwhile, so a full sync that keeps failing never holds every change back.
pub async fn run(
    state: Arc<SharedState>,
    mut dataplane: Box<dyn Dataplane>,
    timing: SyncTiming,
    mut health_checks: Option<HealthCheckServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mode = dataplane.mode();
    let partial_after_failure = dataplane.partial_after_failure();
    let mut last_start: Option<Instant> = None;
    // The last successful full sync, and the last periodic sync (full or, where the dataplane
    // trusts its record between full syncs, partial).
    let mut last_full = Instant::now();
    let mut last_periodic = last_full;
    let full_sync_period = dataplane.full_sync_period();
    let mut full_sync = FullSync::Periodic;
    // What syncs that failed were to program: their Services, for the next partial sync, and
    // their changes' trigger times, so the programming latency counts the wait.
    let mut carried: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut carried_triggers: Vec<SystemTime> = Vec::new();
    loop {
        let now = Instant::now();
        let earliest = last_start.map_or(now, |t| t + timing.min_interval);
        let full_due = match full_sync {
            FullSync::Periodic => last_periodic + timing.sync_period,
            FullSync::Retry { at, .. } => at,
        }
        .max(earliest);
        // A change waits for the owed full sync only where a partial one cannot be trusted.
        let change_due = match full_sync {
            FullSync::Retry { .. } if !partial_after_failure => full_due,
            _ => earliest,
        };
        tokio::select! {
            _ = state.notify.notified() => {
                // Batch: let more changes pile up until the minimum interval has passed.
                tokio::select! {
                    _ = tokio::time::sleep_until(change_due) => {}
                    _ = shutdown.changed() => return,
                }
            }
            _ = tokio::time::sleep_until(full_due) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = Instant::now();
        let woke = now;
        let periodic = now >= full_due && matches!(full_sync, FullSync::Periodic);
        let force_full = match full_sync_period {
            // A dataplane that trusts its record (iptables and nftables modes): the periodic
            // sync is partial (nothing to do if nothing changed) unless a full one is due or
            // the dataplane sees drift in the kernel.
            Some(period) if periodic => now >= last_full + period || dataplane.drifted().await,
            _ => now >= full_due,
        };
        if periodic {
            last_periodic = now;
        }
        let Some(mut snapshot) = state.take_snapshot(force_full) else {
            // Not ready yet, or a partial periodic sync with nothing to do: the next periodic
            // sync is one period later.
            continue;
        };
        let full = snapshot.changes.full;
        tracing::debug!(
            full,
            changed = snapshot.changes.services.len(),
            snapshot_us = woke.elapsed().as_micros() as u64,
            "sync runner: woke and took a snapshot"
        );
        if !full {
            snapshot.changes.services.extend(carried.iter().cloned());
        }
        snapshot.trigger_times.extend(carried_triggers.iter().copied());
        last_start = Some(now);
        match sync_once(dataplane.as_mut(), &snapshot).await {
            Ok(()) => {
                state.health.updated();
                if let Some(hc) = health_checks.as_mut() {
                    hc.sync(&snapshot.desired, &snapshot.changes).await;
                }
                carried.clear();
                carried_triggers.clear();
                if full {
                    last_full = now;
                    last_periodic = now;
                    full_sync = FullSync::Periodic;
                    // The snapshot the sync worked from goes first: its changes may hold the
                    // last references to what the sync replaced.
                    drop(snapshot);
                    release_memory();
                }
            }
            Err(err) => {
                metrics().inc_sync_failures(mode);
                if matches!(err, DataplaneError::Rejected { .. } | DataplaneError::Command { .. }) && mode == "iptables"
                {
                    metrics().inc_iptables_restore_failures();
                }
                carried.extend(std::mem::take(&mut snapshot.changes.services));
                carried_triggers = std::mem::take(&mut snapshot.trigger_times);
                // A missing tool or kernel feature will not fix itself in a second. A partial
                // sync failing meanwhile leaves the owed full sync where it was.
                full_sync = match (err.is_retryable(), full_sync, full) {
                    (true, retry @ FullSync::Retry { .. }, false) => retry,
                    (retryable, previous, _) => {
                        let delay = match (retryable, previous) {
                            (false, _) => timing.sync_period,
                            (true, FullSync::Retry { delay, .. }) => (delay * 2).min(timing.sync_period),
                            (true, FullSync::Periodic) => timing.retry_initial,
                        };
                        FullSync::Retry {
                            at: Instant::now() + delay,
                            delay,
                        }
                    }
                };
                let retry_in = match full_sync {
                    FullSync::Retry { at, .. } => at.saturating_duration_since(Instant::now()),
                    FullSync::Periodic => timing.sync_period,
                };
                tracing::error!(error = %err, ?retry_in, "sync failed; the kernel keeps its previous rules");
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
        // Running counts kept by the store: a partial sync walks no Service it did not change.
        let services = snapshot.service_ports;
        let endpoints = snapshot.endpoints;
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

    /// One call of the dataplane.
    #[derive(Debug, Clone)]
    struct Call {
        start: Instant,
        end: Instant,
        full: bool,
        services: usize,
        changed: BTreeSet<ServiceKey>,
        ok: bool,
    }

    type SyncLog = Arc<Mutex<Vec<Call>>>;

    /// How the fake dataplane behaves.
    #[derive(Debug, Clone, Default)]
    struct Behaviour {
        /// Fail this many syncs first.
        fail_first: usize,
        /// Fail every full sync after the first one.
        fail_later_full: bool,
        /// Fail every partial sync.
        fail_partial: bool,
        /// How long a full sync takes.
        full_takes: Duration,
        partial_after_failure: bool,
        /// Trust the record between full syncs this long (iptables mode's hour).
        full_sync_period: Option<Duration>,
        /// What `drifted` answers, and how often it was asked.
        drifted: Arc<Mutex<(bool, usize)>>,
    }

    /// Records syncs and behaves as told.
    struct Recorder {
        log: SyncLog,
        how: Behaviour,
        calls: usize,
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
            self.calls += 1;
            let how = &self.how;
            let fail = self.calls <= how.fail_first
                || (changes.full && how.fail_later_full && self.calls > 1)
                || (!changes.full && how.fail_partial);
            let takes = if changes.full { how.full_takes } else { Duration::ZERO };
            let log = self.log.clone();
            let mut call = Call {
                start: Instant::now(),
                end: Instant::now(),
                full: changes.full,
                services: desired.services.len(),
                changed: changes.services.clone(),
                ok: !fail,
            };
            Box::pin(async move {
                tokio::time::sleep(takes).await;
                call.end = Instant::now();
                log.lock().unwrap().push(call);
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
        fn partial_after_failure(&self) -> bool {
            self.how.partial_after_failure
        }
        fn full_sync_period(&self) -> Option<Duration> {
            self.how.full_sync_period
        }
        fn drifted(&mut self) -> BoxFuture<'_, bool> {
            let mut d = self.how.drifted.lock().unwrap();
            d.1 += 1;
            let answer = d.0;
            Box::pin(async move { answer })
        }
    }

    fn svc(name: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    fn timing() -> SyncTiming {
        SyncTiming {
            min_interval: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            retry_initial: Duration::from_secs(1),
        }
    }

    fn start(fail: usize) -> (Arc<SharedState>, SyncLog, watch::Sender<bool>) {
        start_with(
            Behaviour {
                fail_first: fail,
                ..Behaviour::default()
            },
            timing(),
        )
    }

    fn start_with(how: Behaviour, timing: SyncTiming) -> (Arc<SharedState>, SyncLog, watch::Sender<bool>) {
        let state = SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))));
        let log = Arc::new(Mutex::new(vec![]));
        let (tx, rx) = watch::channel(false);
        let dp = Box::new(Recorder {
            log: log.clone(),
            how,
            calls: 0,
        });
        tokio::spawn(run(state.clone(), dp, timing, None, rx));
        (state, log, tx)
    }

    fn make_ready(state: &SharedState) {
        state.update(|s| {
            s.replace_services([&svc("a")]);
            s.replace_slices([]);
            s.apply_node(&serde_yaml::from_str::<Node>("metadata: {name: n1}").unwrap())
        });
    }

    fn calls(log: &SyncLog) -> Vec<Call> {
        log.lock().unwrap().clone()
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
        let t0 = calls(&log)[0].start;
        for i in 0..5 {
            state.update(|s| s.apply_service(&svc(&format!("b{i}"))));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 2, "five changes, one batched partial sync");
        assert!(!log[1].full, "partial");
        assert_eq!(log[1].services, 6);
        assert_eq!(log[1].changed.len(), 5);
        assert_eq!(
            log[1].start - t0,
            Duration::from_secs(1),
            "one minimum interval after the first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_quiet_spell_the_first_change_is_programmed_at_once() {
        let (state, log, _tx) = start(0);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let changed_at = Instant::now();
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Three more within the minimum interval: one more sync, one interval after the first.
        for name in ["c", "d", "e"] {
            state.update(|s| s.apply_service(&svc(name)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 3, "{log:?}");
        assert_eq!(log[1].start, changed_at, "no wait for the first change");
        assert_eq!(log[1].changed, BTreeSet::from([key("b")]));
        assert_eq!(log[2].start - log[1].start, Duration::from_secs(1));
        assert_eq!(log[2].changed, BTreeSet::from([key("c"), key("d"), key("e")]));
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_full_resync() {
        let (state, log, _tx) = start(0);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|c| c.full));
    }

    #[tokio::test(start_paused = true)]
    async fn where_the_record_is_trusted_the_periodic_sync_is_partial_until_drift_or_the_full_period() {
        let drifted = Arc::new(Mutex::new((false, 0)));
        let how = Behaviour {
            full_sync_period: Some(Duration::from_secs(300)),
            drifted: drifted.clone(),
            ..Behaviour::default()
        };
        let (state, log, _tx) = start_with(how, timing());
        make_ready(&state);
        // Periodic syncs at 30 and 60 s find nothing changed: no sync at all, only the check.
        tokio::time::sleep(Duration::from_secs(65)).await;
        assert_eq!(calls(&log).iter().map(|c| c.full).collect::<Vec<_>>(), [true]);
        assert_eq!(drifted.lock().unwrap().1, 2, "the drift check runs every period");
        // A change is programmed partially as ever, and the periodic sync after it stays partial.
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(calls(&log).iter().map(|c| c.full).collect::<Vec<_>>(), [true, false]);
        // Drift: the next periodic sync is a full one.
        drifted.lock().unwrap().0 = true;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let log_now = calls(&log);
        assert_eq!(log_now.iter().map(|c| c.full).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!(log_now[2].start - log_now[0].start, Duration::from_secs(120));
        drifted.lock().unwrap().0 = false;
        // Without drift, the next full one comes 300 s after the last full one (at 420 s),
        // on the periodic sync at or after it.
        tokio::time::sleep(Duration::from_secs(330)).await;
        let log_now = calls(&log);
        let fulls: Vec<Duration> = log_now
            .iter()
            .filter(|c| c.full)
            .map(|c| c.start - log_now[0].start)
            .collect();
        assert_eq!(
            fulls,
            [Duration::ZERO, Duration::from_secs(120), Duration::from_secs(420)],
            "{log_now:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_long_full_sync_is_programmed_right_after_it() {
        let how = Behaviour {
            full_takes: Duration::from_secs(10),
            ..Behaviour::default()
        };
        let (state, log, _tx) = start_with(how, timing());
        make_ready(&state);
        // During the first (full) sync.
        tokio::time::sleep(Duration::from_secs(3)).await;
        state.update(|s| s.apply_service(&svc("b")));
        // During the periodic resync, 30 s after the first started.
        tokio::time::sleep(Duration::from_secs(32)).await;
        state.update(|s| s.apply_service(&svc("c")));
        tokio::time::sleep(Duration::from_secs(20)).await;
        let log = calls(&log);
        let kinds: Vec<bool> = log.iter().map(|c| c.full).collect();
        assert_eq!(kinds, [true, false, true, false], "{log:?}");
        assert_eq!(log[1].start, log[0].end, "no minimum interval nor period in between");
        assert_eq!(log[1].changed, BTreeSet::from([key("b")]));
        assert_eq!(log[2].start - log[0].start, Duration::from_secs(30));
        assert_eq!(log[3].start, log[2].end);
        assert_eq!(log[3].changed, BTreeSet::from([key("c")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_full_sync_still_counts_against_the_minimum_interval() {
        let how = Behaviour {
            full_takes: Duration::from_secs(2),
            ..Behaviour::default()
        };
        let timing = SyncTiming {
            min_interval: Duration::from_secs(5),
            ..timing()
        };
        let (state, log, _tx) = start_with(how, timing);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(1)).await;
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[1].start - log[0].start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_retries_with_backoff_as_full_sync() {
        let (state, log, _tx) = start(3);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 4, "initial + 3 retries (1s, 2s, 4s) until success");
        assert!(log.iter().all(|c| c.full));
        let gaps: Vec<u64> = log.windows(2).map(|w| (w[1].start - w[0].start).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_changes_wait_for_the_full_retry_where_partial_syncs_cannot_be_trusted() {
        let (state, log, _tx) = start(1);
        make_ready(&state);
        tokio::time::sleep(Duration::from_millis(500)).await;
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let log = calls(&log);
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(log[1].full && log[1].ok);
        assert_eq!(log[1].start - log[0].start, Duration::from_secs(1));
        assert_eq!(log[1].services, 2, "the change is in the retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_sync_that_keeps_failing_does_not_starve_partial_syncs() {
        let how = Behaviour {
            fail_later_full: true,
            partial_after_failure: true,
            ..Behaviour::default()
        };
        let (state, log, _tx) = start_with(how, timing());
        make_ready(&state);
        // The periodic resync at 30 s fails, and so does every full retry after it.
        tokio::time::sleep(Duration::from_secs(40)).await;
        let changed_at = Instant::now();
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_secs(100)).await;
        let log = calls(&log);
        let partial: Vec<&Call> = log.iter().filter(|c| !c.full).collect();
        assert_eq!(partial.len(), 1, "{log:?}");
        assert_eq!(
            partial[0].start, changed_at,
            "programmed at once, the full retry notwithstanding"
        );
        assert!(partial[0].ok && partial[0].changed.contains(&key("b")));
        let retries: Vec<u64> = log
            .iter()
            .filter(|c| c.full)
            .skip(1)
            .map(|c| (c.start - log[0].start).as_secs())
            .collect();
        assert_eq!(&retries[..5], [30, 31, 33, 37, 45], "backoff goes on: {log:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_services_of_a_failed_partial_sync_are_carried_to_the_next() {
        let how = Behaviour {
            fail_partial: true,
            partial_after_failure: true,
            ..Behaviour::default()
        };
        let timing = SyncTiming {
            retry_initial: Duration::from_secs(5),
            ..timing()
        };
        let (state, log, _tx) = start_with(how, timing);
        make_ready(&state);
        tokio::time::sleep(Duration::from_secs(5)).await;
        state.update(|s| s.apply_service(&svc("b")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        state.update(|s| s.apply_service(&svc("c")));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let log = calls(&log);
        // The partial sync of `b` fails; `c` comes a minimum interval later and carries `b`;
        // that fails too, and the full retry (5 s after the first failure) writes everything.
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(!log[1].full && !log[1].ok, "{log:?}");
        assert_eq!(log[1].changed, BTreeSet::from([key("b")]));
        assert!(!log[2].full, "{log:?}");
        assert_eq!(log[2].start - log[1].start, Duration::from_secs(1));
        assert_eq!(log[2].changed, BTreeSet::from([key("b"), key("c")]));
        assert!(log[3].full && log[3].ok, "{log:?}");
        assert_eq!(
            log[3].start - log[1].start,
            Duration::from_secs(5),
            "the second failure does not push it"
        );
    }
}
