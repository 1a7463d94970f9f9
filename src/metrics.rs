//! Prometheus metrics under kube-proxy's names, plus the process and client metrics of every
//! Kubernetes component, exposed with the `prometheus` crate.
//!
//! Names, help texts and bucket layouts of the `kubeproxy_*` families follow upstream
//! `pkg/proxy/metrics`, so kube-proxy's dashboards and alerts keep working; `process_*` come
//! from the crate's process collector (procfs, as Go's client reads it), `kubernetes_build_info`
//! and `rest_client_*` follow component-base and client-go; kproxy's own are prefixed `kproxy_`.
//! Two kube-proxy counters are read from the kernel at scrape time, as upstream reads them:
//! the nfacct objects that kproxy's iptables rules count into.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::dataplane::nfacct;

/// The process-wide registry, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Every metric kproxy exports. Use [`metrics()`] in the program; tests build their own with
/// [`Metrics::new`] so they do not see each other's observations.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    last_sync: Gauge,
    last_queued: Gauge,
    network_programming: Histogram,
    service_changes_pending: IntGauge,
    service_changes_total: IntCounter,
    endpoint_changes_pending: IntGauge,
    endpoint_changes_total: IntCounter,
    iptables_restore_failures: IntCounter,
    iptables_rules: GaugeVec,
    iptables_rules_last: GaugeVec,
    no_local_endpoints: GaugeVec,
    healthz_total: IntCounterVec,
    livez_total: IntCounterVec,
    conntrack_deleted: IntCounter,
    sync_failures: IntCounterVec,
    programmed_services: IntGauge,
    programmed_endpoints: IntGauge,
    /// `kproxy_ingress_requests_total` and `kproxy_ingress_request_duration_seconds`.
    ingress: Arc<IngressRequests>,
    ingress_connect_errors: IntCounterVec,
    rest_requests: IntCounterVec,
    rest_duration: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// Names and help texts are constants and the registry is new: registration cannot fail.
fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(registry, Gauge::new(name, help).expect("valid gauge"))
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid counter"))
}

/// A family with one label, its listed values present (at zero) from the start, as upstream's.
fn gauge_vec(registry: &Registry, name: &str, help: &str, label: &str, preset: &[&str]) -> GaugeVec {
    let v = register(
        registry,
        GaugeVec::new(Opts::new(name, help), &[label]).expect("valid gauge vec"),
    );
    for p in preset {
        v.with_label_values(&[p]);
    }
    v
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str], preset: &[&str]) -> IntCounterVec {
    let v = register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter vec"),
    );
    for p in preset {
        v.with_label_values(&[p]);
    }
    v
}

impl Metrics {
    /// A registry with every counter, gauge and histogram at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let sync_buckets = prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets");
        if let Err(e) = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
            tracing::debug!(error = %e, "process metrics unavailable");
        }
        register(&r, build_info());
        if let Err(e) = r.register(Box::new(NfacctCollector::new())) {
            tracing::debug!(error = %e, "nfacct metrics unavailable");
        }
        Self {
            sync_duration: histogram(
                &r,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets.clone(),
            ),
            sync_full_duration: histogram(
                &r,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets.clone(),
            ),
            sync_partial_duration: histogram(
                &r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets,
            ),
            last_sync: gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued: gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            network_programming: histogram(
                &r,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
            ),
            service_changes_pending: int_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ),
            service_changes_total: counter(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            endpoint_changes_pending: int_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ),
            endpoint_changes_total: counter(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            iptables_restore_failures: counter(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
            ),
            iptables_rules: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                "table",
                &["filter", "nat"],
            ),
            iptables_rules_last: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
                "table",
                &["filter", "nat"],
            ),
            no_local_endpoints: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                "traffic_policy",
                &["internal", "external"],
            ),
            healthz_total: counter_vec(
                &r,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                &["code"],
                &["200", "503"],
            ),
            livez_total: counter_vec(
                &r,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                &["code"],
                &["200", "503"],
            ),
            conntrack_deleted: counter(
                &r,
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
            ),
            sync_failures: counter_vec(
                &r,
                "kproxy_sync_failures_total",
                "Cumulative failed syncs of proxy rules, by proxy mode",
                &["mode"],
                &[],
            ),
            programmed_services: int_gauge(
                &r,
                "kproxy_programmed_services",
                "Number of services programmed into the dataplane by the last successful sync",
            ),
            programmed_endpoints: int_gauge(
                &r,
                "kproxy_programmed_endpoints",
                "Number of endpoints programmed into the dataplane by the last successful sync",
            ),
            ingress: {
                let ingress = Arc::new(IngressRequests::new());
                r.register(Box::new(IngressCollector(ingress.clone())))
                    .expect("metric names are unique");
                ingress
            },
            ingress_connect_errors: counter_vec(
                &r,
                "kproxy_ingress_upstream_connect_errors_total",
                "Failed connections from the Ingress proxy to a backend, by Service",
                &["service"],
                &[],
            ),
            rest_requests: counter_vec(
                &r,
                "rest_client_requests_total",
                "Number of HTTP requests, partitioned by status code, method, and host.",
                &["code", "host", "method"],
                &[],
            ),
            rest_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "rest_client_request_duration_seconds",
                        "Request latency in seconds. Broken down by verb, and host.",
                    )
                    .buckets(vec![0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]),
                    &["host", "verb"],
                )
                .expect("valid histogram vec"),
            ),
            registry: r,
        }
    }

    /// Records how long one sync took: always in the overall histogram, and in the full or the
    /// partial one depending on `full`.
    pub fn observe_sync(&self, full: bool, took: Duration) {
        let seconds = took.as_secs_f64();
        self.sync_duration.observe(seconds);
        if full {
            self.sync_full_duration.observe(seconds);
        } else {
            self.sync_partial_duration.observe(seconds);
        }
    }

    /// Records the wall-clock time of the last successful sync.
    pub fn set_last_sync(&self, at: SystemTime) {
        self.last_sync.set(unix_seconds(at));
    }

    /// Records the wall-clock time a sync was last requested. Far ahead of the last sync means
    /// the sync loop is stuck.
    pub fn set_last_queued(&self, at: SystemTime) {
        self.last_queued.set(unix_seconds(at));
    }

    /// Records the time from a Service or EndpointSlice change (its trigger time) until a sync
    /// programmed it.
    pub fn observe_network_programming(&self, took: Duration) {
        self.network_programming.observe(took.as_secs_f64());
    }

    /// Sets the number of Service changes waiting for a sync and adds `new` freshly seen ones to
    /// the cumulative count.
    pub fn service_changes(&self, pending: usize, new: u64) {
        self.service_changes_pending.set(pending as i64);
        self.service_changes_total.inc_by(new);
    }

    /// Sets the number of EndpointSlice changes waiting for a sync and adds `new` freshly seen
    /// ones to the cumulative count.
    pub fn endpoint_changes(&self, pending: usize, new: u64) {
        self.endpoint_changes_pending.set(pending as i64);
        self.endpoint_changes_total.inc_by(new);
    }

    /// Counts one failed `iptables-restore` (also used by IPVS mode for its iptables part).
    pub fn inc_iptables_restore_failures(&self) {
        self.iptables_restore_failures.inc();
    }

    /// Sets the number of rules per table written by the last full iptables sync.
    pub fn set_iptables_rules(&self, filter: usize, nat: usize) {
        self.iptables_rules.with_label_values(&["filter"]).set(filter as f64);
        self.iptables_rules.with_label_values(&["nat"]).set(nat as f64);
    }

    /// Sets the number of rules per table the last iptables sync wrote (partial or full).
    pub fn set_iptables_rules_last(&self, filter: usize, nat: usize) {
        self.iptables_rules_last
            .with_label_values(&["filter"])
            .set(filter as f64);
        self.iptables_rules_last.with_label_values(&["nat"]).set(nat as f64);
    }

    /// Sets how many Services with a Local traffic policy have no local endpoint, per policy.
    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        self.no_local_endpoints
            .with_label_values(&["internal"])
            .set(internal as f64);
        self.no_local_endpoints
            .with_label_values(&["external"])
            .set(external as f64);
    }

    /// Counts one `/healthz` answer by HTTP status code.
    pub fn inc_healthz(&self, code: u16) {
        self.healthz_total.with_label_values(&[&code.to_string()]).inc();
    }

    /// Counts one `/livez` answer by HTTP status code.
    pub fn inc_livez(&self, code: u16) {
        self.livez_total.with_label_values(&[&code.to_string()]).inc();
    }

    /// Counts one failed sync of any kind for the given proxy mode (`iptables`, `nftables`, `ipvs`).
    pub fn inc_sync_failures(&self, mode: &str) {
        self.sync_failures.with_label_values(&[mode]).inc();
    }

    /// Sets the number of Services and endpoints the last successful sync programmed.
    pub fn set_programmed(&self, services: usize, endpoints: usize) {
        self.programmed_services.set(services as i64);
        self.programmed_endpoints.set(endpoints as i64);
    }

    /// Adds conntrack entries deleted because their endpoint went away.
    pub fn add_conntrack_deleted(&self, entries: u64) {
        self.conntrack_deleted.inc_by(entries);
    }

    /// Counts one Ingress request; `ingress` and `service` are empty when no route matched.
    /// From any thread; a worker thread counts through its [`IngressShard`] instead.
    pub fn inc_ingress_request(&self, ingress: &str, service: &str, code: u16) {
        self.ingress
            .shared_requests
            .with_label_values(&[ingress, service, &code.to_string()])
            .inc();
    }

    /// Records the time from a request's arrival to its response head. From any thread; a
    /// worker thread records through its [`IngressShard`] instead.
    pub fn observe_ingress_duration(&self, took: Duration) {
        self.ingress.shared_duration.observe(took.as_secs_f64());
    }

    /// A new shard of the Ingress request metrics for one worker thread to write, summed into
    /// the same series at every scrape.
    pub fn ingress_shard(&self) -> Arc<IngressShard> {
        let shard = Arc::new(IngressShard {
            requests: Mutex::new(HashMap::new()),
            buckets: self.ingress.bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            bounds: self.ingress.bounds.clone(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        });
        if let Ok(mut shards) = self.ingress.shards.lock() {
            shards.push(shard.clone());
        }
        shard
    }

    /// Counts one failed connection to a backend of `service` (`ns/name`).
    pub fn inc_ingress_connect_error(&self, service: &str) {
        self.ingress_connect_errors.with_label_values(&[service]).inc();
    }

    /// One request to the API server, as client-go counts it: `code` is the HTTP status or
    /// `<error>` when no response came; the latency runs until the response head.
    pub fn observe_rest_request(&self, host: &str, method: &str, code: &str, took: Duration) {
        self.rest_requests.with_label_values(&[code, host, method]).inc();
        self.rest_duration
            .with_label_values(&[host, method])
            .observe(took.as_secs_f64());
    }

    /// The whole registry in Prometheus text format 0.0.4, families sorted by name.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The Ingress proxy's request count and duration, written per worker thread and summed at
/// scrape: a worker's request costs no atomic read-modify-write (prometheus' counter and
/// histogram make five per request, on cache lines every worker shares). Each worker writes
/// its own [`IngressShard`] with plain loads and stores; requests counted off a worker (HTTP/2,
/// a route table being replaced) go to the shared prometheus series. Names, labels, help
/// texts and buckets are those of the shared series, which render them.
struct IngressRequests {
    shared_requests: IntCounterVec,
    shared_duration: Histogram,
    bounds: Arc<[f64]>,
    shards: Mutex<Vec<Arc<IngressShard>>>,
}

const INGRESS_REQUESTS: (&str, &str) = (
    "kproxy_ingress_requests_total",
    "Requests answered by the Ingress proxy, by Ingress, Service and status code",
);

/// A `kproxy_ingress_requests_total` counter vec: the shared series, and the scrape's scratch
/// sum of it and the shards.
fn ingress_requests_vec() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new(INGRESS_REQUESTS.0, INGRESS_REQUESTS.1),
        &["ingress", "service", "code"],
    )
    .expect("valid counter vec")
}

impl IngressRequests {
    fn new() -> Self {
        let bounds = prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
        IngressRequests {
            shared_requests: ingress_requests_vec(),
            shared_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kproxy_ingress_request_duration_seconds",
                    "Time from a request's arrival to its response head, in seconds",
                )
                .buckets(bounds.clone()),
            )
            .expect("valid histogram"),
            bounds: bounds.into(),
            shards: Mutex::new(Vec::new()),
        }
    }
}

/// One worker thread's part of the Ingress request metrics. Only that thread writes it (plain
/// loads and stores of its own cells: a second writer would lose counts); scrapes read it.
pub struct IngressShard {
    /// Request counts by (ingress, service, code). Locked when a worker first counts a series
    /// and at scrape, never per request.
    requests: Mutex<HashMap<(String, String, u16), Arc<AtomicU64>>>,
    bounds: Arc<[f64]>,
    /// Observations per bucket (not cumulative), as `bounds`.
    buckets: Box<[AtomicU64]>,
    /// The sum of observations, an `f64`'s bits.
    sum: AtomicU64,
    count: AtomicU64,
}

/// The single writer's increment: a load and a store, no locked instruction.
fn bump(cell: &AtomicU64, by: u64) {
    cell.store(cell.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

impl IngressShard {
    /// The request counter for these labels, for the worker to keep and [`ShardCounter::inc`].
    pub fn request_counter(&self, ingress: &str, service: &str, code: u16) -> ShardCounter {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        ShardCounter(
            requests
                .entry((ingress.to_string(), service.to_string(), code))
                .or_default()
                .clone(),
        )
    }

    /// Records one request's duration (time to its response head).
    pub fn observe_duration(&self, took: Duration) {
        let v = took.as_secs_f64();
        // The first bucket whose upper bound is at least v; none above the last bound.
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(cell) = self.buckets.get(i) {
            bump(cell, 1);
        }
        let sum = &self.sum;
        sum.store(
            (f64::from_bits(sum.load(Ordering::Relaxed)) + v).to_bits(),
            Ordering::Relaxed,
        );
        // Last, with Release: a scrape that reads the count (Acquire) sees the buckets of
        // every observation it counts.
        self.count
            .store(self.count.load(Ordering::Relaxed) + 1, Ordering::Release);
    }
}

/// One series' count in a worker's [`IngressShard`].
pub struct ShardCounter(Arc<AtomicU64>);

impl ShardCounter {
    pub fn inc(&self) {
        bump(&self.0, 1);
    }
}

struct IngressCollector(Arc<IngressRequests>);

impl Collector for IngressCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.0.shared_requests.desc();
        d.extend(self.0.shared_duration.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let ingress = &self.0;
        let shards = ingress.shards.lock().map(|s| s.clone()).unwrap_or_default();
        // The counters: the shared series and every shard's, summed by labels in a
        // scratch vector, which renders them as the shared one would.
        let requests = ingress_requests_vec();
        for family in ingress.shared_requests.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or("", |l| l.value())
                };
                requests
                    .with_label_values(&[label("ingress"), label("service"), label("code")])
                    .inc_by(m.get_counter().get_value() as u64);
            }
        }
        for shard in &shards {
            let series = shard.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((ingress, service, code), n) in series.iter() {
                requests
                    .with_label_values(&[ingress, service, &code.to_string()])
                    .inc_by(n.load(Ordering::Relaxed));
            }
        }
        let mut families = requests.collect();
        // The histogram: the shared one's, with every shard's observations added.
        let mut duration = ingress.shared_duration.collect();
        if let Some(family) = duration.first_mut() {
            let mut metrics = family.take_metric();
            if let Some(m) = metrics.first_mut() {
                let shared = m.get_histogram();
                let mut count = shared.get_sample_count();
                let mut sum = shared.get_sample_sum();
                let mut per_bucket = vec![0u64; ingress.bounds.len()];
                for shard in &shards {
                    let n = shard.count.load(Ordering::Acquire);
                    sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
                    let mut in_buckets = 0;
                    for (total, cell) in per_bucket.iter_mut().zip(shard.buckets.iter()) {
                        let b = cell.load(Ordering::Relaxed);
                        *total += b;
                        in_buckets += b;
                    }
                    // Observations made while this was read may show in a bucket and not yet
                    // in the count: the count is never below the buckets.
                    count += n.max(in_buckets);
                }
                let mut cumulative = 0;
                let buckets = shared
                    .get_bucket()
                    .iter()
                    .zip(per_bucket)
                    .map(|(b, add)| {
                        cumulative += add;
                        let mut out = prometheus::proto::Bucket::default();
                        out.set_cumulative_count(b.cumulative_count() + cumulative);
                        out.set_upper_bound(b.upper_bound());
                        out
                    })
                    .collect();
                let mut h = prometheus::proto::Histogram::default();
                h.set_sample_count(count);
                h.set_sample_sum(sum);
                h.set_bucket(buckets);
                m.set_histogram(h);
            }
            family.set_metric(metrics);
        }
        families.append(&mut duration);
        families
    }
}

/// component-base's `kubernetes_build_info`: constant 1, labelled with the version kproxy
/// stands in for.
fn build_info() -> IntGauge {
    let opts = Opts::new(
        "kubernetes_build_info",
        "A metric with a constant '1' value labeled by major, minor, git version, git commit, git tree state, build date, Go version, and compiler from which Kubernetes was built, and platform on which it is running.",
    )
    .const_label("major", "1")
    .const_label("minor", "33")
    .const_label("git_version", crate::cli::KUBE_VERSION)
    .const_label("git_commit", option_env!("KPROXY_GIT_COMMIT").unwrap_or(""))
    .const_label("git_tree_state", "")
    .const_label("build_date", "")
    .const_label("go_version", "")
    .const_label("compiler", "rustc")
    .const_label("platform", format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH));
    let g = IntGauge::with_opts(opts).expect("valid build info");
    g.set(1);
    g
}

/// kube-proxy's two nfacct-backed counters, read from the kernel at every scrape (as its
/// custom collectors do). A counter the kernel does not have (another mode, no nfacct support)
/// is left out of the scrape, as upstream leaves it out.
struct NfacctCollector {
    descs: Vec<Desc>,
}

const NFACCT_METRICS: [(&str, &str, &str); 2] = [
    (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
        "packets dropped by iptables to work around conntrack problems",
        nfacct::CT_STATE_INVALID_DROPPED,
    ),
    (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
        "Number of packets accepted on nodeports of loopback interface",
        nfacct::LOCALHOST_NODEPORTS_ACCEPTED,
    ),
];

impl NfacctCollector {
    fn new() -> Self {
        let descs = NFACCT_METRICS
            .iter()
            .filter_map(|(name, help, _)| {
                Desc::new(name.to_string(), help.to_string(), vec![], Default::default()).ok()
            })
            .collect();
        NfacctCollector { descs }
    }
}

impl Collector for NfacctCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(counters) = nfacct::list() else {
            return vec![];
        };
        NFACCT_METRICS
            .iter()
            .filter_map(|(name, help, object)| {
                let packets = counters.iter().find(|c| c.name == *object)?.packets;
                let c = IntCounter::new(*name, *help).ok()?;
                c.inc_by(packets);
                c.collect().into_iter().next()
            })
            .collect()
    }
}

/// Upstream's network programming layout. It is built with component-base's `MergeBuckets`,
/// which starts from a 0 bound, so `le="0"` is part of the exported series and kept here.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0];
    let linear = |start: f64, width: f64, count: usize| (0..count).map(move |i| start + width * i as f64);
    buckets.extend(linear(0.25, 0.25, 2)); // 0.25s, 0.5s
    buckets.extend(linear(1.0, 1.0, 59)); // 1s .. 59s
    buckets.extend(linear(60.0, 5.0, 12)); // 60s .. 115s
    buckets.extend(linear(120.0, 30.0, 7)); // 2min .. 5min
    buckets
}

/// Seconds since the Unix epoch; a clock set before 1970 reads as 0 rather than failing a sync.
fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of one metric family: its HELP and TYPE lines and its samples.
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| {
                if let Some(comment) = line.strip_prefix("# ") {
                    let mut words = comment.split(' ');
                    words.next();
                    return words.next() == Some(name);
                }
                let sample = line.split(['{', ' ']).next().unwrap_or_default();
                sample == name
                    || sample
                        .strip_prefix(name)
                        .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
            })
            .collect()
    }

    #[test]
    fn full_sync_histogram_renders_cumulative_buckets_sum_and_count() {
        let m = Metrics::new();
        m.observe_sync(true, Duration::from_millis(250));
        m.observe_sync(true, Duration::from_millis(500));
        m.observe_sync(true, Duration::from_secs(2));
        m.observe_sync(true, Duration::from_secs(40));

        let text = m.render();
        let expected = [
            "# HELP kubeproxy_sync_full_proxy_rules_duration_seconds SyncProxyRules latency in seconds for full resyncs",
            "# TYPE kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.008\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.016\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.032\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.064\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.128\"} 0",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.256\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.512\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"1.024\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"2.048\"} 3",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"4.096\"} 3",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"8.192\"} 3",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 3",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 4",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_sum 42.75",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 4",
        ];
        let got = family(&text, "kubeproxy_sync_full_proxy_rules_duration_seconds");
        for (i, (got, want)) in got.iter().zip(expected).enumerate() {
            assert_eq!(*got, want, "line {i} of the full-sync histogram");
        }
        assert_eq!(got.len(), expected.len());

        // Every sync lands in the overall histogram; full syncs never in the partial one.
        let overall = family(&text, "kubeproxy_sync_proxy_rules_duration_seconds");
        assert!(overall.contains(&"kubeproxy_sync_proxy_rules_duration_seconds_count 4"));
        let partial = family(&text, "kubeproxy_sync_partial_proxy_rules_duration_seconds");
        assert!(partial.contains(&"kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0"));
    }

    #[test]
    fn observation_equal_to_a_bound_falls_in_that_bucket() {
        let m = Metrics::new();
        m.observe_sync(false, Duration::from_millis(1));
        let text = m.render();
        let partial = family(&text, "kubeproxy_sync_partial_proxy_rules_duration_seconds");
        assert!(partial.contains(&"kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 1"));
    }

    #[test]
    fn network_programming_uses_upstream_buckets_including_zero() {
        let m = Metrics::new();
        m.observe_network_programming(Duration::from_millis(300));
        m.observe_network_programming(Duration::from_secs(600));
        let text = m.render();
        let lines = family(&text, "kubeproxy_network_programming_duration_seconds");
        let bounds: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split("le=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        // 0, 0.25, 0.5, 1..=59, 60..=115 by 5, 120..=300 by 30, +Inf
        assert_eq!(bounds.len(), 1 + 2 + 59 + 12 + 7 + 1);
        assert_eq!(&bounds[..5], ["0", "0.25", "0.5", "1", "2"]);
        assert_eq!(&bounds[bounds.len() - 3..], ["270", "300", "+Inf"]);
        let name = "kubeproxy_network_programming_duration_seconds";
        assert!(lines.contains(&format!("{name}_bucket{{le=\"0.25\"}} 0").as_str()));
        assert!(lines.contains(&format!("{name}_bucket{{le=\"0.5\"}} 1").as_str()));
        assert!(lines.contains(&format!("{name}_bucket{{le=\"300\"}} 1").as_str()));
        assert!(lines.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 2").as_str()));
    }

    #[test]
    fn counters_and_gauges() {
        let m = Metrics::new();
        m.service_changes(3, 5);
        m.service_changes(0, 2);
        m.endpoint_changes(7, 7);
        m.inc_iptables_restore_failures();
        m.inc_iptables_restore_failures();
        m.add_conntrack_deleted(4);
        m.set_iptables_rules(12, 345);
        m.set_no_local_endpoints(1, 0);
        m.set_programmed(10, 25);
        m.inc_sync_failures("nftables");
        m.inc_sync_failures("iptables");
        m.inc_sync_failures("nftables");
        m.inc_healthz(503);
        m.set_last_sync(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        m.set_last_queued(UNIX_EPOCH + Duration::from_secs(1_700_000_001));
        let text = m.render();

        for line in [
            "kubeproxy_sync_proxy_rules_service_changes_pending 0",
            "kubeproxy_sync_proxy_rules_service_changes_total 7",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 7",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 7",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 2",
            "kubeproxy_conntrack_reconciler_deleted_entries_total 4",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"} 12",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 345",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 1",
            "kproxy_programmed_services 10",
            "kproxy_programmed_endpoints 25",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1700000000.5",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 1700000001",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line: {line}");
        }
        assert_eq!(
            family(&text, "kproxy_sync_failures_total"),
            [
                "# HELP kproxy_sync_failures_total Cumulative failed syncs of proxy rules, by proxy mode",
                "# TYPE kproxy_sync_failures_total counter",
                "kproxy_sync_failures_total{mode=\"iptables\"} 1",
                "kproxy_sync_failures_total{mode=\"nftables\"} 2",
            ]
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let m = Metrics::new();
        m.inc_sync_failures("a\"b\\c\nd");
        let text = m.render();
        assert!(text
            .lines()
            .any(|l| l == r#"kproxy_sync_failures_total{mode="a\"b\\c\nd"} 1"#));
    }

    #[test]
    fn ingress_requests_carry_three_labels() {
        let m = Metrics::new();
        m.inc_ingress_request("default/web", "default/svc", 200);
        m.inc_ingress_request("default/web", "default/svc", 200);
        m.inc_ingress_request("", "", 404);
        let text = m.render();
        assert!(
            text.lines()
                .any(|l| l
                    == r#"kproxy_ingress_requests_total{code="200",ingress="default/web",service="default/svc"} 2"#),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l == r#"kproxy_ingress_requests_total{code="404",ingress="",service=""} 1"#));
    }

    #[test]
    fn ingress_shards_render_as_one_prometheus_counter_and_histogram_would() {
        let m = Metrics::new();
        let a = m.ingress_shard();
        let b = m.ingress_shard();
        // The same series counted by two workers and off the workers.
        let web_a = a.request_counter("default/web", "default/svc", 200);
        let web_b = b.request_counter("default/web", "default/svc", 200);
        for _ in 0..3 {
            web_a.inc();
        }
        web_b.inc();
        b.request_counter("default/web", "default/svc", 503).inc();
        m.inc_ingress_request("default/web", "default/svc", 200);
        m.inc_ingress_request("", "", 404);
        // A kept counter and one looked up again are the same series.
        a.request_counter("default/web", "default/svc", 200).inc();
        let took = [0.0004, 0.001, 0.0015, 0.3, 0.9, 120.0];
        for (i, t) in took.iter().enumerate() {
            let d = Duration::from_secs_f64(*t);
            match i % 3 {
                0 => a.observe_duration(d),
                1 => b.observe_duration(d),
                _ => m.observe_ingress_duration(d),
            }
        }

        // What one registered counter vec and histogram render for the same requests.
        let reference = Registry::new();
        let requests = register(&reference, ingress_requests_vec());
        requests
            .with_label_values(&["default/web", "default/svc", "200"])
            .inc_by(6);
        requests.with_label_values(&["default/web", "default/svc", "503"]).inc();
        requests.with_label_values(&["", "", "404"]).inc();
        let duration = histogram(
            &reference,
            "kproxy_ingress_request_duration_seconds",
            "Time from a request's arrival to its response head, in seconds",
            prometheus::exponential_buckets(0.001, 2.0, 16).unwrap(),
        );
        for t in took {
            duration.observe(Duration::from_secs_f64(t).as_secs_f64());
        }
        let mut expected = Vec::new();
        TextEncoder::new().encode(&reference.gather(), &mut expected).unwrap();
        let expected = String::from_utf8(expected).unwrap();

        let text = m.render();
        // The sum is added in another order: equal up to rounding.
        let sum_of = |t: &str| -> f64 {
            family(t, "kproxy_ingress_request_duration_seconds")
                .iter()
                .find_map(|l| l.strip_prefix("kproxy_ingress_request_duration_seconds_sum "))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        assert!((sum_of(&text) - sum_of(&expected)).abs() < 1e-9);
        let but_sum = |t: &str, name: &str| -> Vec<String> {
            family(t, name)
                .into_iter()
                .filter(|l| !l.contains("_sum "))
                .map(str::to_string)
                .collect()
        };
        for name in [INGRESS_REQUESTS.0, "kproxy_ingress_request_duration_seconds"] {
            assert_eq!(but_sum(&text, name), but_sum(&expected, name), "{name}");
        }
        assert!(family(&text, "kproxy_ingress_request_duration_seconds")
            .contains(&"kproxy_ingress_request_duration_seconds_count 6"));
    }

    #[test]
    fn every_family_is_declared_once_sorted_by_name() {
        let m = Metrics::new();
        // process_* values move between two scrapes; everything else renders the same.
        let stable = |t: String| {
            t.lines()
                .filter(|l| !l.contains("process_"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(stable(m.render()), stable(m.render()), "render must be deterministic");
        let text = m.render();
        let types: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        let mut sorted = types.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(types, sorted, "one declaration per family, sorted by name");
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "kubeproxy_network_programming_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_service_changes_pending gauge",
            "kubeproxy_sync_proxy_rules_service_changes_total counter",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total counter",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter",
            "kubeproxy_sync_proxy_rules_iptables_total gauge",
            "kubeproxy_sync_proxy_rules_iptables_last gauge",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "kubeproxy_proxy_healthz_total counter",
            "kubeproxy_proxy_livez_total counter",
            "kubeproxy_conntrack_reconciler_deleted_entries_total counter",
            "kproxy_programmed_services gauge",
            "kproxy_programmed_endpoints gauge",
            "kproxy_ingress_request_duration_seconds histogram",
            "kubernetes_build_info gauge",
            "process_cpu_seconds_total counter",
            "process_resident_memory_bytes gauge",
            "process_start_time_seconds gauge",
            "process_open_fds gauge",
            "process_max_fds gauge",
        ] {
            assert!(types.contains(&want), "missing {want}");
        }
        // Each sample belongs to the family declared just before it.
        let mut current = "";
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                current = decl.split(' ').next().unwrap_or_default();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(current), "{line} outside its family {current}");
            }
        }
    }

    #[test]
    fn client_requests_as_client_go_counts_them() {
        let m = Metrics::new();
        m.observe_rest_request("10.0.0.1:6443", "GET", "200", Duration::from_millis(30));
        m.observe_rest_request("10.0.0.1:6443", "GET", "200", Duration::from_millis(3));
        let text = m.render();
        assert!(text
            .lines()
            .any(|l| l == r#"rest_client_requests_total{code="200",host="10.0.0.1:6443",method="GET"} 2"#));
        assert!(
            text.lines()
                .any(|l| l
                    == r#"rest_client_request_duration_seconds_bucket{host="10.0.0.1:6443",verb="GET",le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l
                    == r#"rest_client_request_duration_seconds_bucket{host="10.0.0.1:6443",verb="GET",le="0.1"} 2"#)
        );
    }

    #[test]
    fn global_registry_is_shared() {
        assert!(std::ptr::eq(metrics(), metrics()));
    }
}
