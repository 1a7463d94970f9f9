//! Running kproxy for a test: the process in the node namespace, its desired-state source,
//! and clients that send real packets.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{run, Topology};

/// How long a condition may take before the test fails: generous, because CI machines are slow;
/// the tests assert behaviour, never speed.
/// `KPROXY_TEST_DEADLINE` (seconds) raises it where everything is slower, as in the emulated
/// guest of `scripts/ipvs-vm.sh`.
pub fn deadline() -> Duration {
    static SECS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    Duration::from_secs(*SECS.get_or_init(|| {
        std::env::var("KPROXY_TEST_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20)
    }))
}

/// Polls `f` until it returns `Some`, failing the test with `what` after [`deadline`].
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline(), "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kproxy binary under test: the one cargo built, or `KPROXY_BIN` (set where the test
/// binary runs away from the build tree, as in the IPVS guest of `scripts/ipvs-vm.sh`).
pub fn kproxy_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| std::env::var("KPROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kproxy").to_string()))
}

/// A running kproxy inside the node namespace; killed on drop.
pub struct Kproxy {
    child: Option<Child>,
    pub log: PathBuf,
    node_ns: String,
}

impl Kproxy {
    /// Starts `kproxy` with `args` in `topo`'s node namespace, logging to a file. `tools`, if
    /// given, is searched first for the tools kproxy runs (to fake a failing one); `env` is
    /// added to kproxy's environment (and may set PATH).
    pub fn start_with_env(
        topo: &Topology,
        args: &[String],
        tools: Option<&std::path::Path>,
        env: &[(&str, String)],
    ) -> Kproxy {
        let log = std::env::temp_dir().join(format!("{}-kproxy.log", topo.id));
        let file = std::fs::File::create(&log).expect("log file");
        let mut path = std::env::var("PATH").unwrap_or_default();
        if let Some(dir) = tools {
            path = format!("{}:{path}", dir.display());
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &topo.node, kproxy_bin()])
            .args(args)
            .env("RUST_LOG", "info,kproxy=debug")
            .env("PATH", path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start kproxy");
        Kproxy {
            child: Some(child),
            log,
            node_ns: topo.node.clone(),
        }
    }

    /// The kproxy process id (`ip netns exec` execs the binary in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with the log if kproxy has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kproxy exited with {status}:\n{}", self.log_text());
            }
        }
    }

    /// A metric's value from kproxy's /metrics (in the node namespace).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.node_ns,
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://127.0.0.1:10249/metrics",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// The whole /metrics page.
    pub fn metrics_text(&self) -> String {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.node_ns,
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://127.0.0.1:10249/metrics",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Number of successful syncs so far.
    pub fn syncs(&self) -> u64 {
        self.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")
            .unwrap_or(0.0) as u64
    }

    /// Waits until a sync after the `after`-th has completed.
    pub fn wait_sync_after(&mut self, after: u64) {
        let start = Instant::now();
        loop {
            self.assert_running();
            if self.syncs() > after {
                return;
            }
            assert!(
                start.elapsed() < deadline(),
                "no sync after #{after}; kproxy log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Kproxy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- kproxy log ({}) ----\n{}", self.log.display(), self.log_text());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Outcome of one HTTP request: the body, or curl's exit code (7 refused, 28 timed out).
pub fn curl(topo: &Topology, ns: &str, url: &str) -> Result<String, i32> {
    let out = topo.exec(ns, &["curl", "-s", "--connect-timeout", "3", "--max-time", "5", url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(out.status.code().unwrap_or(-1))
    }
}

/// One UDP request with this test binary's client mode; the reply, if any.
pub fn udp(topo: &Topology, ns: &str, addr: &str) -> Option<String> {
    udp_from(topo, ns, addr, 0)
}

/// One UDP request from a fixed source port (0: any).
pub fn udp_from(topo: &Topology, ns: &str, addr: &str, sport: u16) -> Option<String> {
    let exe = std::env::current_exe().expect("test binary");
    let exe = exe.to_string_lossy();
    let sport = sport.to_string();
    let out = topo.exec(ns, &[&exe, "__udp", addr, &sport]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Which pods answered `n` requests to `url` from `ns` (the echo body starts with the pod name);
/// the curl exit code of the first request that failed.
pub fn try_backends(topo: &Topology, ns: &str, url: &str, n: usize) -> Result<Vec<String>, i32> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let body = curl(topo, ns, url)?;
        let pod = body.split_whitespace().next().unwrap_or_default().to_string();
        if !seen.contains(&pod) {
            seen.push(pod);
        }
    }
    seen.sort();
    Ok(seen)
}

/// Like [`try_backends`], for when every request must succeed.
pub fn backends(topo: &Topology, ns: &str, url: &str, n: usize) -> Vec<String> {
    try_backends(topo, ns, url, n)
        .unwrap_or_else(|code| panic!("request to {url} from {ns} failed with curl exit {code}"))
}

/// Waits until `n` requests in a row reach exactly `want` (transient failures while a sync is
/// pending are retried).
pub fn eventually_backends(topo: &Topology, ns: &str, url: &str, n: usize, want: &[&str]) {
    eventually(&format!("{url} from {ns} answered by exactly {want:?}"), || {
        (try_backends(topo, ns, url, n).ok()? == want).then_some(())
    });
}
