//! kproxy as a drop-in for kube-proxy v1.33, through the real binary: kube-proxy's own
//! `--write-config-to` output, kubeadm's ConfigMap and kube-proxy's whole flag list must start
//! (`--validate`) with the values kube-proxy would use, compared field by field; what kproxy
//! writes with `--write-config-to` must read back unchanged; values that cannot be valid exit 2.
//! As root, the conntrack sysctls are checked in a network namespace where they are writable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const KPROXY: &str = env!("CARGO_BIN_EXE_kproxy");
const SCRATCH: &str = env!("CARGO_TARGET_TMPDIR");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/fixtures/kube-proxy-v1.33");

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(SCRATCH).join("dropin");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

fn run(args: &[String]) -> Output {
    Command::new(KPROXY)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running kproxy")
}

fn describe(args: &[String], out: &Output) -> String {
    format!(
        "kproxy {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The effective configuration for these arguments, as kproxy writes it in kube-proxy's format,
/// flattened to `path -> value` (`conntrack.min -> 131072`). Also checks `--validate` accepts.
fn effective(args: &[String], name: &str) -> BTreeMap<String, Value> {
    let mut validate = args.to_vec();
    validate.push("--validate".into());
    let out = run(&validate);
    assert!(
        out.status.success(),
        "--validate refused:\n{}",
        describe(&validate, &out)
    );
    let path = scratch(&format!("{name}.effective.yaml"));
    let mut write = args.to_vec();
    write.push(format!("--write-config-to={}", path.display()));
    let out = run(&write);
    assert!(
        out.status.success(),
        "--write-config-to failed:\n{}",
        describe(&write, &out)
    );
    let text = std::fs::read_to_string(&path).expect("written config");
    flatten(&serde_yaml::from_str(&text).expect("YAML"))
}

fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// kube-proxy v1.33's effective values with no flags and no file, after its platform defaults.
fn kube_proxy_defaults() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/write-config-to.yaml")).expect("fixture");
    flatten(&serde_yaml::from_str(&text).expect("fixture YAML"))
}

/// Compares field by field; a mismatch names every field that differs.
fn assert_fields(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>, what: &str) {
    let mut diffs = Vec::new();
    for key in want.keys().chain(got.keys()).collect::<std::collections::BTreeSet<_>>() {
        if got.get(key) != want.get(key) {
            diffs.push(format!(
                "  {key}: kproxy {:?}, kube-proxy {:?}",
                got.get(key),
                want.get(key)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: fields differ from kube-proxy's:\n{}",
        diffs.join("\n")
    );
}

fn with(base: &BTreeMap<String, Value>, changes: &[(&str, Value)]) -> BTreeMap<String, Value> {
    let mut m = base.clone();
    for (k, v) in changes {
        m.insert(k.to_string(), v.clone());
    }
    m
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

#[test]
fn kube_proxy_default_configuration_is_what_kproxy_writes_and_reads() {
    // kproxy with no flags writes kube-proxy's --write-config-to output, byte for byte.
    let path = scratch("defaults.yaml");
    let args = vec![format!("--write-config-to={}", path.display())];
    let out = run(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let ours = std::fs::read_to_string(&path).unwrap();
    let theirs = std::fs::read_to_string(format!("{FIXTURES}/write-config-to.yaml")).unwrap();
    for (i, (a, b)) in ours.lines().zip(theirs.lines()).enumerate() {
        assert_eq!(a, b, "line {} of --write-config-to", i + 1);
    }
    assert_eq!(ours.lines().count(), theirs.lines().count());
    // And kube-proxy's own output is accepted, with the same effective values.
    let fixture = format!("{FIXTURES}/write-config-to.yaml");
    let got = effective(&["--config".into(), fixture], "kube-proxy-defaults");
    assert_fields(&got, &kube_proxy_defaults(), "kube-proxy's --write-config-to output");
}

#[test]
fn kubeadm_configmap_zero_values_mean_defaults() {
    let cm: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{FIXTURES}/kubeadm-configmap.yaml")).unwrap()).unwrap();
    let conf = cm["data"]["config.conf"].as_str().expect("config.conf");
    let path = scratch("kubeadm-config.conf");
    std::fs::write(&path, conf).unwrap();
    let got = effective(
        &[
            "--config".into(),
            path.display().to_string(),
            "--hostname-override=$(NODE_NAME)".into(),
        ],
        "kubeadm",
    );
    let want = with(
        &kube_proxy_defaults(),
        &[
            ("clientConnection.kubeconfig", s("/var/lib/kube-proxy/kubeconfig.conf")),
            ("clusterCIDR", s("10.244.0.0/16")),
            // --hostname-override wins over the file, lowercased, as kube-proxy does.
            ("hostnameOverride", s("$(node_name)")),
        ],
    );
    assert_fields(&got, &want, "kubeadm's ConfigMap");
}

#[test]
fn every_kube_proxy_flag_with_typical_values() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/flags.txt")).unwrap();
    let flags: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    assert!(flags.len() >= 60, "the fixture lists every flag");
    let got = effective(&flags, "flags");
    let want = with(
        &kube_proxy_defaults(),
        &[
            ("bindAddress", s("10.0.0.5")),
            ("clientConnection.burst", 20.into()),
            ("clientConnection.contentType", s("application/json")),
            ("clientConnection.kubeconfig", s("/var/lib/kube-proxy/kubeconfig.conf")),
            ("clientConnection.qps", 10.into()),
            ("clusterCIDR", s("10.244.0.0/16,fd00:10:244::/56")),
            ("conntrack.tcpBeLiberal", true.into()),
            ("conntrack.udpStreamTimeout", s("2m0s")),
            ("conntrack.udpTimeout", s("30s")),
            ("detectLocal.bridgeInterface", s("cbr0")),
            ("detectLocal.interfaceNamePrefix", s("veth")),
            ("featureGates.LoggingAlphaOptions", true.into()),
            ("featureGates.TopologyAwareHints", true.into()),
            ("healthzBindAddress", s("0.0.0.0:10256")),
            ("hostnameOverride", s("node-1")),
            ("iptables.localhostNodePorts", false.into()),
            ("iptables.masqueradeAll", true.into()),
            // --ipvs-* periods are ignored outside ipvs mode, as in kube-proxy.
            ("iptables.minSyncPeriod", s("2s")),
            ("iptables.syncPeriod", s("45s")),
            ("ipvs.excludeCIDRs", serde_json::json!(["10.0.0.0/8"])),
            ("ipvs.scheduler", s("rr")),
            ("ipvs.strictARP", true.into()),
            ("ipvs.tcpFinTimeout", s("2m0s")),
            ("ipvs.tcpTimeout", s("15m0s")),
            ("ipvs.udpTimeout", s("5m0s")),
            ("logging.format", s("json")),
            ("logging.verbosity", 2.into()),
            (
                "logging.vmodule",
                serde_json::json!([{"filePattern": "proxier*", "verbosity": 5}]),
            ),
            ("metricsBindAddress", s("0.0.0.0:10249")),
            ("nodePortAddresses", serde_json::json!(["10.0.0.0/8"])),
            ("rootHnsEndpointName", Value::Null),
            ("showHiddenMetricsForVersion", s("1.32")),
            ("winkernel.rootHnsEndpointName", s("cbr0")),
        ],
    );
    let mut want = want;
    want.remove("rootHnsEndpointName");
    want.remove("featureGates");
    assert_fields(&got, &want, "kube-proxy's flags");
}

#[test]
fn with_config_flags_are_ignored_but_logging_and_hostname_win() {
    let path = scratch("mode-ipvs.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\nipvs: {syncPeriod: 20s}\n",
    )
    .unwrap();
    let args: Vec<String> = [
        "--config",
        path.to_str().unwrap(),
        "--proxy-mode=nftables",
        "--ipvs-sync-period=5s",
        "--masquerade-all",
        "-v=4",
        "--logging-format=json",
        "--hostname-override=Other",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = effective(&args, "config-wins");
    assert_eq!(got["mode"], s("ipvs"), "--proxy-mode is ignored with --config");
    assert_eq!(got["ipvs.syncPeriod"], s("20s"));
    // ipvs.minSyncPeriod is not defaulted by kube-proxy: 0s in ipvs mode from a file.
    assert_eq!(got["ipvs.minSyncPeriod"], s("0s"));
    assert_eq!(got["iptables.masqueradeAll"], Value::Bool(false));
    assert_eq!(got["logging.verbosity"], Value::from(4));
    assert_eq!(got["logging.format"], s("json"));
    assert_eq!(got["hostnameOverride"], s("other"));
    let out = run(&[args, vec!["--validate".into()]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--proxy-mode") && stderr.contains("ignored"),
        "the ignored flags are named: {stderr}"
    );
    // JSON logging: every line an object.
    for line in stderr.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{line}");
    }
}

#[test]
fn kproxy_reads_back_what_it_writes() {
    let first = scratch("roundtrip-1.yaml");
    let args: Vec<String> = [
        "--proxy-mode=nftables",
        "--cluster-cidr=10.244.0.0/16",
        "--conntrack-udp-timeout=10s",
        "--feature-gates=AllAlpha=false",
        "--oom-score-adj=-500",
        "--iptables-min-sync-period=250ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = effective(&args, "roundtrip-flags");
    assert_eq!(
        got["nftables.minSyncPeriod"],
        s("250ms"),
        "the mode's section carries the periods"
    );
    assert_eq!(
        got["nodePortAddresses"],
        serde_json::json!(["primary"]),
        "nftables defaults to primary"
    );
    let mut write = args.clone();
    write.push(format!("--write-config-to={}", first.display()));
    assert!(run(&write).status.success());
    let again = effective(&["--config".into(), first.display().to_string()], "roundtrip-file");
    assert_fields(&again, &got, "kproxy's own --write-config-to output");
}

#[test]
fn values_that_cannot_be_valid_exit_2_naming_the_field() {
    let file = |name: &str, body: &str| {
        let p = scratch(name);
        std::fs::write(
            &p,
            format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"),
        )
        .unwrap();
        p.display().to_string()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--proxy-mode=userspace".into()], "ProxyMode"),
        (vec!["--iptables-masquerade-bit=40".into()], "MasqueradeBit"),
        (vec!["--oom-score-adj=2000".into()], "OOMScoreAdj"),
        (vec!["--conntrack-min=-1".into()], "Min"),
        (
            vec!["--feature-gates=NoSuchGate=true".into()],
            "unrecognized feature gate",
        ),
        (vec!["--feature-gates=NFTablesProxyMode=false".into()], "locked"),
        (vec!["--iptables-sync-period=fast".into()], "--iptables-sync-period"),
        (vec!["--masquerade-all=maybe".into()], "--masquerade-all"),
        (vec!["--bind-address=nope".into()], "--bind-address"),
        (vec!["--cluster-cidr=10.0.0.0/33".into()], "ClusterCIDRs"),
        (vec!["--nodeport-addresses=primary,10.0.0.0/8".into()], "primary"),
        (vec!["--detect-local-mode=BridgeInterface".into()], "InterfaceName"),
        (vec!["--logging-format=xml".into()], "logging.format"),
        (
            vec!["--show-hidden-metrics-for-version=1.20".into()],
            "ShowHiddenMetricsForVersion",
        ),
        (vec!["--iptables-min-sync-period=1m".into()], "SyncPeriod"),
        (
            vec![
                "--config".into(),
                file("bad-dur.yaml", "iptables: {syncPeriod: soon}\n"),
            ],
            "invalid duration",
        ),
        (
            vec![
                "--config".into(),
                file("bad-type.yaml", "iptables: {masqueradeBit: \"14\"}\n"),
            ],
            "masqueradeBit",
        ),
        (
            vec!["--config".into(), "/nonexistent/kproxy.yaml".into()],
            "reading config file",
        ),
    ];
    for (args, needle) in &cases {
        let mut a = args.clone();
        a.push("--validate".into());
        let out = run(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&a, &out));
        assert!(stderr.contains(needle), "error does not name {needle:?}: {stderr}");
    }
    let p = scratch("kindless.yaml");
    std::fs::write(&p, "mode: iptables\n").unwrap();
    let out = run(&["--config".into(), p.display().to_string(), "--validate".into()]);
    assert_eq!(out.status.code(), Some(2), "kube-proxy requires apiVersion and kind");
}

#[test]
fn combinations_kube_proxy_accepts() {
    // ClusterCIDR with no cluster CIDR: a warning, no local detection; unknown fields: a warning.
    let p = scratch("accepts.yaml");
    std::fs::write(
        &p,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\ndetectLocalMode: ClusterCIDR\nsomethingNew: 1\n",
    )
    .unwrap();
    let args = vec!["--config".into(), p.display().to_string(), "--validate".into()];
    let out = run(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("clusterCIDR is empty"), "{stderr}");
    assert!(stderr.contains("somethingNew"), "{stderr}");
    // Inert flags are named in one warning.
    let args: Vec<String> = ["--profiling", "--vmodule=a=1", "--windows-service", "--validate"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = run(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let inert: Vec<&str> = stderr.lines().filter(|l| l.contains("no effect in kproxy")).collect();
    assert_eq!(inert.len(), 1, "{stderr}");
    assert!(inert[0].contains("--profiling") && inert[0].contains("--vmodule") && inert[0].contains("Windows"));
}

#[test]
fn version_as_kube_proxy_prints_it() {
    let out = run(&["--version".into()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Kubernetes v1.33."));
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `--init-only` in a fresh network namespace: the per-namespace conntrack sysctls are set for
/// real; nf_conntrack_max and hashsize belong to the initial namespace here, so they are
/// skipped with a warning naming them, and kproxy still exits 0.
#[test]
fn init_only_sets_conntrack_sysctls_in_a_network_namespace() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = format!("kpdropin-{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let sysctl = |name: &str| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "cat", &format!("/proc/sys/net/netfilter/{name}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Move every value away from what kproxy will write.
    for (name, v) in [
        ("nf_conntrack_tcp_timeout_established", "1000"),
        ("nf_conntrack_tcp_timeout_close_wait", "1000"),
        ("nf_conntrack_tcp_be_liberal", "0"),
        ("nf_conntrack_udp_timeout", "1000"),
        ("nf_conntrack_udp_timeout_stream", "1000"),
    ] {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "sh",
                "-c",
                &format!("echo {v} > /proc/sys/net/netfilter/{name}"),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "preparing {name}");
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, KPROXY])
        .args([
            "--init-only",
            "--conntrack-tcp-timeout-established=2h",
            "--conntrack-tcp-timeout-close-wait=30m",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=3m",
            "--oom-score-adj=-500",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_established"), "7200");
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_close_wait"), "1800");
    assert_eq!(sysctl("nf_conntrack_tcp_be_liberal"), "1");
    assert_eq!(sysctl("nf_conntrack_udp_timeout"), "45");
    assert_eq!(sysctl("nf_conntrack_udp_timeout_stream"), "180");
    // nf_conntrack_max is read-only outside the initial namespace on this kernel: skipped, named.
    assert!(
        stderr.contains("nf_conntrack_max") && stderr.contains("not writable here"),
        "the skipped sysctl is named: {stderr}"
    );
}
