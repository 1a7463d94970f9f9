//! Test hosts in network namespaces: a node with routed veths to pods and to an outside
//! client, real servers in the pods, and teardown that runs even when a test panics.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Every namespace the tests create starts with this, so a crashed run can be swept.
pub const NS_PREFIX: &str = "kpt";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs a command, returning its output; panics with the command line if it cannot start.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} {args:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn must(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes namespaces left behind by an earlier run that was killed. Namespaces of a test run
/// still going (another checkout's, on a shared machine) are left alone: killing its kproxy
/// would fail that run for nothing.
pub fn sweep_stale() {
    let list = must("ip", &["netns", "list"]);
    let running = running_test_ids();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let owner = rest.split('x').next().and_then(|id| id.parse::<u32>().ok());
        if owner.is_some_and(|id| running.contains(&id)) {
            continue;
        }
        kill_all_in(name);
        let _ = run("ip", &["netns", "del", name]);
    }
}

/// The namespace ids (`pid % 100000`, see [`Topology::new`]) of every live process that is a
/// test binary like this one (same name before its hash), this one included.
fn running_test_ids() -> std::collections::BTreeSet<u32> {
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let me = comm("self");
    let family = me.trim().split('-').next().unwrap_or_default().to_string();
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Ok(pid) = name.parse::<u32>() else { continue };
        if !family.is_empty() && comm(&name).trim().split('-').next() == Some(family.as_str()) {
            ids.insert(pid % 100_000);
        }
    }
    ids
}

fn kill_all_in(ns: &str) {
    let pids = run("ip", &["netns", "pids", ns]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = run("kill", &["-9", pid]);
    }
}

/// A pod: a namespace behind a veth, with its address.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A node namespace with pods and an outside client, torn down on drop.
pub struct Topology {
    pub id: String,
    pub node: String,
    pub client: String,
    /// The node's address on the client link: its "node IP".
    pub node_ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Topology {
    /// A node with `pods` pods (10.244.N.2, N = 1..) and a client at 192.0.2.100 reaching the
    /// node at 192.0.2.1.
    pub fn new(pods: usize) -> Topology {
        let id = format!(
            "{NS_PREFIX}{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let node = format!("{id}n");
        let client = format!("{id}c");
        let mut topo = Topology {
            id: id.clone(),
            node: node.clone(),
            client: client.clone(),
            node_ip: Ipv4Addr::new(192, 0, 2, 1),
            pods: vec![],
            namespaces: vec![],
            children: vec![],
        };
        topo.add_ns(&node);
        topo.add_ns(&client);
        topo.exec_ok(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        topo.exec_ok(&node, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        // Client link: the node's "public" address.
        must(
            "ip",
            &[
                "link", "add", "vc", "netns", &node, "type", "veth", "peer", "name", "eth0", "netns", &client,
            ],
        );
        topo.exec_ok(&node, &["ip", "addr", "add", "192.0.2.1/24", "dev", "vc"]);
        topo.exec_ok(&node, &["ip", "link", "set", "vc", "up"]);
        topo.exec_ok(&client, &["ip", "addr", "add", "192.0.2.100/24", "dev", "eth0"]);
        topo.exec_ok(&client, &["ip", "link", "set", "eth0", "up"]);
        // IPv6 on the same links (nodad: usable at once, no duplicate address detection wait).
        topo.exec_ok(&node, &["ip", "addr", "add", "fd00:2::1/64", "dev", "vc", "nodad"]);
        topo.exec_ok(
            &client,
            &["ip", "addr", "add", "fd00:2::100/64", "dev", "eth0", "nodad"],
        );
        // The client reaches load-balancer and external IPs through the node, as a router would.
        topo.exec_ok(&client, &["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
        // A default route, as every real node has: service IPs without endpoints must still be
        // routable for the reject rules to see them.
        topo.exec_ok(&node, &["ip", "route", "add", "default", "via", "192.0.2.100"]);
        topo.exec_ok(&node, &["ip", "-6", "route", "add", "default", "via", "fd00:2::100"]);
        for i in 1..=pods {
            topo.add_pod(i);
        }
        topo
    }

    fn add_ns(&mut self, ns: &str) {
        must("ip", &["netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        self.exec_ok(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// Adds pod number `i` (1-based) at 10.244.i.2 and fd00:244:i::2 behind node veth `v{i}`.
    pub fn add_pod(&mut self, i: usize) -> Pod {
        let name = format!("pod-{}", char::from(b'a' + (i as u8 - 1)));
        let ns = format!("{}p{i}", self.id);
        self.add_ns(&ns);
        let node_if = format!("v{i}");
        must(
            "ip",
            &[
                "link", "add", &node_if, "netns", &self.node, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        let gw = format!("10.244.{i}.1");
        self.exec_ok(&self.node, &["ip", "addr", "add", &format!("{gw}/24"), "dev", &node_if]);
        self.exec_ok(&self.node, &["ip", "link", "set", &node_if, "up"]);
        self.exec_ok(&ns, &["ip", "addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"]);
        self.exec_ok(&ns, &["ip", "link", "set", "eth0", "up"]);
        self.exec_ok(&ns, &["ip", "route", "add", "default", "via", &gw]);
        let gw6 = format!("fd00:244:{i}::1");
        self.exec_ok(
            &self.node,
            &["ip", "addr", "add", &format!("{gw6}/64"), "dev", &node_if, "nodad"],
        );
        self.exec_ok(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("fd00:244:{i}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        self.exec_ok(&ns, &["ip", "-6", "route", "add", "default", "via", &gw6]);
        let pod = Pod {
            name,
            ns,
            ip: Ipv4Addr::new(10, 244, i as u8, 2),
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Runs `args` inside `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", ns];
        full.extend(args);
        run("ip", &full)
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", ns];
        full.extend(args);
        must("ip", &full)
    }

    /// Starts the echo server (this test binary in `serve` mode) in every pod: HTTP on TCP
    /// `port`, echo on UDP `port`, each answering with the pod name and the peer address.
    pub fn start_servers(&mut self, port: u16) {
        let exe = std::env::current_exe().expect("test binary path");
        for pod in self.pods.clone() {
            let child = Command::new("ip")
                .args(["netns", "exec", &pod.ns])
                .arg(&exe)
                .args(["__serve", &pod.name, &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start echo server");
            self.children.push(child);
        }
        // Wait until each answers locally.
        for pod in self.pods.clone() {
            let url = format!("http://{}:{port}/", pod.ip);
            crate::harness::eventually(&format!("server in {} up", pod.name), || {
                let out = self.exec(&pod.ns, &["curl", "-s", "--max-time", "1", &url]);
                out.status.success().then_some(())
            });
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            kill_all_in(ns);
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}
