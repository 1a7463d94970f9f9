//! Prometheus metrics under kube-proxy's names, rendered in text exposition format 0.0.4.
//!
//! Hand-written rather than a metrics crate: the set is small and fixed, values change once per
//! sync (never per packet), and a fixed render order keeps the output deterministic. Names, help
//! texts and bucket layouts follow upstream `pkg/proxy/metrics` so existing kube-proxy dashboards
//! and alerts keep working; metrics of our own are prefixed `kproxy_`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The process-wide registry, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Every metric kproxy exports. Use [`metrics()`] in the program; tests build their own with
/// [`Metrics::new`] so they do not see each other's observations.
pub struct Metrics {
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    last_sync: Gauge,
    last_queued: Gauge,
    network_programming: Histogram,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    iptables_restore_failures: Counter,
    iptables_rules: Family,
    no_local_endpoints: Family,
    healthz_total: Family,
    livez_total: Family,
    conntrack_deleted: Counter,
    sync_failures: Family,
    programmed_services: Gauge,
    programmed_endpoints: Gauge,
    ingress_requests: LabeledCounter,
    ingress_duration: Histogram,
    ingress_connect_errors: Family,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every counter, gauge and histogram at zero.
    pub fn new() -> Self {
        let sync_buckets = exponential_buckets(0.001, 2.0, 15);
        Self {
            sync_duration: Histogram::new(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets.clone(),
            ),
            sync_full_duration: Histogram::new(
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets.clone(),
            ),
            sync_partial_duration: Histogram::new(
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets,
            ),
            last_sync: Gauge::new(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued: Gauge::new(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            network_programming: Histogram::new(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
            ),
            service_changes_pending: Gauge::new(
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ),
            service_changes_total: Counter::new(
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            endpoint_changes_pending: Gauge::new(
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ),
            endpoint_changes_total: Counter::new(
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            iptables_restore_failures: Counter::new(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
            ),
            iptables_rules: Family::new(
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                Kind::Gauge,
                "table",
                &["filter", "nat"],
            ),
            no_local_endpoints: Family::new(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                Kind::Gauge,
                "traffic_policy",
                &["internal", "external"],
            ),
            healthz_total: Family::new(
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                Kind::Counter,
                "code",
                &["200", "503"],
            ),
            livez_total: Family::new(
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                Kind::Counter,
                "code",
                &["200", "503"],
            ),
            conntrack_deleted: Counter::new(
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
            ),
            sync_failures: Family::new(
                "kproxy_sync_failures_total",
                "Cumulative failed syncs of proxy rules, by proxy mode",
                Kind::Counter,
                "mode",
                &[],
            ),
            programmed_services: Gauge::new(
                "kproxy_programmed_services",
                "Number of services programmed into the dataplane by the last successful sync",
            ),
            programmed_endpoints: Gauge::new(
                "kproxy_programmed_endpoints",
                "Number of endpoints programmed into the dataplane by the last successful sync",
            ),
            ingress_requests: LabeledCounter::new(
                "kproxy_ingress_requests_total",
                "Requests answered by the Ingress proxy, by Ingress, Service and status code",
                &["ingress", "service", "code"],
            ),
            ingress_duration: Histogram::new(
                "kproxy_ingress_request_duration_seconds",
                "Time from a request's arrival to its response head, in seconds",
                exponential_buckets(0.001, 2.0, 16),
            ),
            ingress_connect_errors: Family::new(
                "kproxy_ingress_upstream_connect_errors_total",
                "Failed connections from the Ingress proxy to a backend, by Service",
                Kind::Counter,
                "service",
                &[],
            ),
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
        self.service_changes_pending.set(pending as f64);
        self.service_changes_total.add(new);
    }

    /// Sets the number of EndpointSlice changes waiting for a sync and adds `new` freshly seen
    /// ones to the cumulative count.
    pub fn endpoint_changes(&self, pending: usize, new: u64) {
        self.endpoint_changes_pending.set(pending as f64);
        self.endpoint_changes_total.add(new);
    }

    /// Counts one failed `iptables-restore` (also used by IPVS mode for its iptables part).
    pub fn inc_iptables_restore_failures(&self) {
        self.iptables_restore_failures.add(1);
    }

    /// Sets the number of rules per table written by the last full iptables sync.
    pub fn set_iptables_rules(&self, filter: usize, nat: usize) {
        self.iptables_rules.set("filter", filter as f64);
        self.iptables_rules.set("nat", nat as f64);
    }

    /// Sets how many Services with a Local traffic policy have no local endpoint, per policy.
    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        self.no_local_endpoints.set("internal", internal as f64);
        self.no_local_endpoints.set("external", external as f64);
    }

    /// Counts one `/healthz` answer by HTTP status code.
    pub fn inc_healthz(&self, code: u16) {
        self.healthz_total.add(&code.to_string(), 1.0);
    }

    /// Counts one `/livez` answer by HTTP status code.
    pub fn inc_livez(&self, code: u16) {
        self.livez_total.add(&code.to_string(), 1.0);
    }

    /// Counts one failed sync of any kind for the given proxy mode (`iptables`, `nftables`, `ipvs`).
    pub fn inc_sync_failures(&self, mode: &str) {
        self.sync_failures.add(mode, 1.0);
    }

    /// Sets the number of Services and endpoints the last successful sync programmed.
    pub fn set_programmed(&self, services: usize, endpoints: usize) {
        self.programmed_services.set(services as f64);
        self.programmed_endpoints.set(endpoints as f64);
    }

    /// Adds conntrack entries deleted because their endpoint went away.
    pub fn add_conntrack_deleted(&self, entries: u64) {
        self.conntrack_deleted.add(entries);
    }

    /// Counts one Ingress request; `ingress` and `service` are empty when no route matched.
    pub fn inc_ingress_request(&self, ingress: &str, service: &str, code: u16) {
        self.ingress_requests.inc(&[ingress, service, &code.to_string()]);
    }

    /// The counter of Ingress requests for these labels, for a worker to keep and increment
    /// without looking it up (or allocating its labels) on every request.
    pub fn ingress_request_counter(&self, ingress: &str, service: &str, code: u16) -> Arc<AtomicU64> {
        self.ingress_requests.series(&[ingress, service, &code.to_string()])
    }

    /// Records the time from a request's arrival to its response head.
    pub fn observe_ingress_duration(&self, took: Duration) {
        self.ingress_duration.observe(took.as_secs_f64());
    }

    /// Counts one failed connection to a backend of `service` (`ns/name`).
    pub fn inc_ingress_connect_error(&self, service: &str) {
        self.ingress_connect_errors.add(service, 1.0);
    }

    /// The whole registry in Prometheus text format 0.0.4, always in the same order.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.sync_duration.render(&mut out);
        self.sync_full_duration.render(&mut out);
        self.sync_partial_duration.render(&mut out);
        self.last_sync.render(&mut out);
        self.last_queued.render(&mut out);
        self.network_programming.render(&mut out);
        self.service_changes_pending.render(&mut out);
        self.service_changes_total.render(&mut out);
        self.endpoint_changes_pending.render(&mut out);
        self.endpoint_changes_total.render(&mut out);
        self.iptables_restore_failures.render(&mut out);
        self.iptables_rules.render(&mut out);
        self.no_local_endpoints.render(&mut out);
        self.healthz_total.render(&mut out);
        self.livez_total.render(&mut out);
        self.conntrack_deleted.render(&mut out);
        self.sync_failures.render(&mut out);
        self.programmed_services.render(&mut out);
        self.programmed_endpoints.render(&mut out);
        self.ingress_requests.render(&mut out);
        self.ingress_duration.render(&mut out);
        self.ingress_connect_errors.render(&mut out);
        out
    }
}

/// Prometheus' `ExponentialBuckets`: `count` upper bounds from `start`, each `factor` times the last.
fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b * factor))
        .take(count)
        .collect()
}

/// Prometheus' `LinearBuckets`: `count` upper bounds from `start`, `width` apart.
fn linear_buckets(start: f64, width: f64, count: usize) -> Vec<f64> {
    (0..count).map(|i| start + width * i as f64).collect()
}

/// Upstream's network programming layout. It is built with component-base's `MergeBuckets`,
/// which starts from a 0 bound, so `le="0"` is part of the exported series and kept here.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0];
    buckets.extend(linear_buckets(0.25, 0.25, 2)); // 0.25s, 0.5s
    buckets.extend(linear_buckets(1.0, 1.0, 59)); // 1s .. 59s
    buckets.extend(linear_buckets(60.0, 5.0, 12)); // 60s .. 115s
    buckets.extend(linear_buckets(120.0, 30.0, 7)); // 2min .. 5min
    buckets
}

/// Seconds since the Unix epoch; a clock set before 1970 reads as 0 rather than failing a sync.
fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Values are single numbers updated in one step, so a panic while a lock was held cannot leave
/// them half-written: keep serving them rather than poisoning `/metrics` for the process lifetime.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }

    fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, Kind::Counter);
        let value = self.value.load(Ordering::Relaxed);
        write_line(out, format_args!("{} {value}", self.name));
    }
}

struct Gauge {
    name: &'static str,
    help: &'static str,
    /// An `f64` kept as its bit pattern, because std has no atomic float.
    bits: AtomicU64,
}

impl Gauge {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            bits: AtomicU64::new(0.0_f64.to_bits()),
        }
    }

    fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, Kind::Gauge);
        let value = f64::from_bits(self.bits.load(Ordering::Relaxed));
        write_line(out, format_args!("{} {}", self.name, format_float(value)));
    }
}

struct Histogram {
    name: &'static str,
    help: &'static str,
    /// Upper bounds, ascending, without the implicit `+Inf`.
    bounds: Vec<f64>,
    /// Per-bucket (not cumulative) counts; one more than `bounds`, the last being `+Inf`.
    /// Atomics, not a lock: the Ingress workers observe one value per request.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(name: &'static str, help: &'static str, bounds: Vec<f64>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            name,
            help,
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, value: f64) {
        // `le` is inclusive: a value equal to a bound belongs to that bucket.
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, Kind::Histogram);
        // Read once: the count is the buckets' total, so the series stay consistent with
        // each other even while observations come in.
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&counts) {
            cumulative += count;
            write_line(
                out,
                format_args!("{}_bucket{{le=\"{}\"}} {cumulative}", self.name, format_float(*bound)),
            );
        }
        let total: u64 = counts.iter().sum();
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        write_line(out, format_args!("{}_bucket{{le=\"+Inf\"}} {total}", self.name));
        write_line(out, format_args!("{}_sum {}", self.name, format_float(sum)));
        write_line(out, format_args!("{}_count {total}", self.name));
    }
}

/// A counter or gauge with one label. Series are kept in a `BTreeMap` so they render sorted.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    label: &'static str,
    series: Mutex<BTreeMap<String, f64>>,
}

impl Family {
    /// `known` label values are exported as 0 from the start, so a dashboard sees the series
    /// before the first event instead of a gap.
    fn new(name: &'static str, help: &'static str, kind: Kind, label: &'static str, known: &[&str]) -> Self {
        let series = known.iter().map(|v| ((*v).to_owned(), 0.0)).collect();
        Self {
            name,
            help,
            kind,
            label,
            series: Mutex::new(series),
        }
    }

    fn set(&self, label_value: &str, value: f64) {
        lock(&self.series).insert(label_value.to_owned(), value);
    }

    fn add(&self, label_value: &str, delta: f64) {
        *lock(&self.series).entry(label_value.to_owned()).or_insert(0.0) += delta;
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, self.kind);
        for (label_value, value) in lock(&self.series).iter() {
            write_line(
                out,
                format_args!(
                    "{}{{{}=\"{}\"}} {}",
                    self.name,
                    self.label,
                    escape_label_value(label_value),
                    format_float(*value)
                ),
            );
        }
    }
}

/// A counter with several labels; series render sorted by their label values.
struct LabeledCounter {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// Each series' count is shared with the callers that hold it (see [`LabeledCounter::series`]).
    series: Mutex<BTreeMap<Vec<String>, Arc<AtomicU64>>>,
}

impl LabeledCounter {
    fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn inc(&self, values: &[&str]) {
        self.series(values).fetch_add(1, Ordering::Relaxed);
    }

    /// The count of one series, created at zero, for callers that count often.
    fn series(&self, values: &[&str]) -> Arc<AtomicU64> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        lock(&self.series).entry(key).or_default().clone()
    }

    fn render(&self, out: &mut String) {
        write_header(out, self.name, self.help, Kind::Counter);
        for (values, count) in lock(&self.series).iter() {
            let count = count.load(Ordering::Relaxed);
            let labels: Vec<String> = self
                .labels
                .iter()
                .zip(values)
                .map(|(l, v)| format!("{l}=\"{}\"", escape_label_value(v)))
                .collect();
            write_line(out, format_args!("{}{{{}}} {count}", self.name, labels.join(",")));
        }
    }
}

fn write_header(out: &mut String, name: &str, help: &str, kind: Kind) {
    write_line(out, format_args!("# HELP {name} {}", escape_help(help)));
    write_line(out, format_args!("# TYPE {name} {}", kind.as_str()));
}

fn write_line(out: &mut String, line: std::fmt::Arguments<'_>) {
    // Formatting into a String cannot fail; the Result exists only for io-backed writers.
    let _ = out.write_fmt(line);
    out.push('\n');
}

/// Numbers as Prometheus parses them: Rust's shortest round-trip form, which never uses an
/// exponent, plus the spellings of the special values that Rust would print differently.
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

/// Text format 0.0.4: in HELP, only backslash and newline are escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Text format 0.0.4: in label values, backslash, double quote and newline are escaped.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
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
        assert_eq!(escape_help("a\\b\nc\"d"), r#"a\\b\nc"d"#);
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
                    == r#"kproxy_ingress_requests_total{ingress="default/web",service="default/svc",code="200"} 2"#),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l == r#"kproxy_ingress_requests_total{ingress="",service="",code="404"} 1"#));
    }

    #[test]
    fn special_floats_use_prometheus_spelling() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(1e-7), "0.0000001");
    }

    #[test]
    fn every_family_is_declared_once_in_a_fixed_order() {
        let m = Metrics::new();
        let text = m.render();
        assert_eq!(text, m.render(), "render must be deterministic");
        let types: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert_eq!(
            types,
            [
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
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
                "kubeproxy_proxy_healthz_total counter",
                "kubeproxy_proxy_livez_total counter",
                "kubeproxy_conntrack_reconciler_deleted_entries_total counter",
                "kproxy_sync_failures_total counter",
                "kproxy_programmed_services gauge",
                "kproxy_programmed_endpoints gauge",
                "kproxy_ingress_requests_total counter",
                "kproxy_ingress_request_duration_seconds histogram",
                "kproxy_ingress_upstream_connect_errors_total counter",
            ]
        );
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
    fn global_registry_is_shared() {
        assert!(std::ptr::eq(metrics(), metrics()));
    }
}
