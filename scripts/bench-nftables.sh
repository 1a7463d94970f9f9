#!/usr/bin/env bash
# Benchmark of nftables mode's writers: kproxy's netlink writer (this tree) and the `nft -f`
# writer it replaced (commit 9823b8b, built in a temporary worktree). For each size (Services x
# 10 endpoints) it measures the first full sync, then one EndpointSlice change at a time (one
# endpoint replaced by a new address):
#   - API -> kernel: kproxy watches the integration tests' fake API server (examples/fakeapi.rs,
#     in kproxy's namespace, lists and watches as the real one serves them); from the moment the
#     fake stored the changed EndpointSlice (and sent the watch event) to the moment the new
#     address is in the kernel (the commit's netlink notification, seen by a listener on
#     NFNLGRP_NFTABLES in the node namespace). SOURCE=manifests measures from manifest files
#     instead (from the manifest source's log line that it loaded the file);
#   - the same again with --sync-period 4s (as many changes), so that changes arrive while
#     periodic resyncs (and the netlink writer's checks) run;
#   - kproxy's CPU time per change, user and system (the kernel's commit runs in kproxy's
#     sendmsg: its system time), over the changes less its idle rate;
#   - the machine's load average during the run (the machine is shared: latencies stretch with
#     load, CPU times much less).
# Writes its section of BENCHMARKS.md and docs/bench-nftables.png. Never run by the tests.
#
# usage: sudo scripts/bench-nftables.sh [SIZES] [CHANGES]     (default: "1000 5000 10000" 100)
#        WRITERS="netlink nft-f": also measure the nft -f writer again (default: its rows
#        already in BENCHMARKS.md are kept, and plotted), NFTF_CHANGES (default 15) changes
#        per phase: its changes during resyncs take 15 to 30 s each at 10,000 Services;
#        PREVIOUS=LABEL: the rows of the measured writer's previous run are kept, labelled LABEL;
#        AFFINITY=1 ...: every Service with sessionAffinity ClientIP (a set per endpoint); its
#        own section of BENCHMARKS.md and its own plot. AFFINITY=0.1: every tenth Service
#        (not the changed ones), in that section too;
#        KPROXY_BIN=PATH FAKEAPI_BIN=PATH: measure these binaries instead of building this tree
#        (say in BENCHMARKS.md which profile they were built with);
#        BENCH_FOREIGN: what else runs in the resync phase. Default "check": the hourly check
#        of the whole table every 4 s (KPROXY_NFTABLES_FULL_CHECK_PERIOD=4), as the issue's
#        "changes that arrive while a periodic resync runs", and another writer committing a
#        table of its own through one `nft -i` process (a daemon writer: kproxy's
#        notifications show it need not check). Each other value has its own section and
#        plot: "own": that writer through an `nft` process per commit (each exit makes the
#        kernel hold its commit mutex for an RCU grace period, which every writer's next
#        commit waits for); kproxy: a chain added into kproxy's table, so that every periodic
#        sync checks what it touched; kproxy-set: a set declared in kproxy's table, which
#        forces a whole check; own-socket: the daemon writer alone; full: the whole check
#        every 4 s alone; 0: none;
#        BASELINE="LABEL=PATH": also measure the kproxy binary at PATH, labelled LABEL, right
#        after the measured one at each size (interleaved, so both see the same load).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
sizes=${1:-1000 5000 10000}
changes=${2:-100}
[ "$(id -u)" = 0 ] || { echo "bench-nftables.sh: needs root" >&2; exit 1; }

mkdir -p "$here/target/bench"
if [ -n "${KPROXY_BIN:-}" ]; then
  cp "$KPROXY_BIN" "$here/target/bench/kproxy-netlink"
  cp "${FAKEAPI_BIN:-$(dirname "$KPROXY_BIN")/examples/fakeapi}" "$here/target/bench/fakeapi"
else
  cargo build --quiet --release --manifest-path "$here/Cargo.toml" --bin kproxy --example fakeapi
  cp "$here/target/release/kproxy" "$here/target/bench/kproxy-netlink"
  cp "$here/target/release/examples/fakeapi" "$here/target/bench/fakeapi"
fi
if [ -n "${BASELINE:-}" ]; then
  cp "${BASELINE#*=}" "$here/target/bench/kproxy-baseline"
fi
old=$here/target/bench/kproxy-nft-f
if [[ " ${WRITERS:-netlink} " == *" nft-f "* ]] && [ ! -x "$old" ]; then
  # The nft -f writer, as it was before the netlink one replaced it.
  tree=$(mktemp -d /tmp/kproxy-nft-f.XXXXXX)
  git -C "$here" worktree add -f "$tree" 9823b8b >/dev/null
  cargo build --quiet --release --manifest-path "$tree/Cargo.toml" --target-dir "$here/target/bench/old-target" --bin kproxy
  cp "$here/target/bench/old-target/release/kproxy" "$old"
  git -C "$here" worktree remove --force "$tree"
fi
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib

# shellcheck disable=SC2086 # one argument per size
exec python3 - "$here" "$changes" $sizes <<'PY'
import datetime, json, os, random, re, signal, statistics, subprocess, sys, tempfile, threading, time

here, changes_arg, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
nftf_changes = int(os.environ.get("NFTF_CHANGES", "15"))
affinity_share = float(os.environ.get("AFFINITY", "0") or 0)
affinity = affinity_share > 0
affinity_every = max(1, round(1 / affinity_share)) if affinity else 0
def sticky(i):
    return ", sessionAffinity: ClientIP" if affinity and i % affinity_every == 0 else ""
# BENCH_FOREIGN=own (default): the resync phase's other writer commits a table of its own;
# BENCH_FOREIGN=kproxy: it commits into kproxy's table (a chain added and deleted), so that
# each periodic sync checks the table; BENCH_FOREIGN=0: no other writer.
foreign_mode = {"1": "own"}.get(os.environ.get("BENCH_FOREIGN", "check"), os.environ.get("BENCH_FOREIGN", "check"))
tag = ("-affinity" if affinity else "") + {"own": "-foreign-exits", "kproxy": "-foreign-in-table", "kproxy-set": "-foreign-whole", "own-socket": "-foreign-socket", "full": "-full-checks"}.get(foreign_mode, "")
# The whole check every 4 s: alone (full) or with the daemon writer (check, the default).
full_checks = foreign_mode in ("full", "check")
M = 10
all_writers = {"netlink": ("netlink", f"{here}/target/bench/kproxy-netlink"), "nft-f": ("nft -f", f"{here}/target/bench/kproxy-nft-f")}
writers = [all_writers[w] for w in os.environ.get("WRITERS", "netlink").split()]
baseline = os.environ.get("BASELINE", "").split("=", 1)[0]
if baseline:
    writers.insert(1, (baseline, f"{here}/target/bench/kproxy-baseline"))
source = os.environ.get("SOURCE", "api")
FAKEAPI = f"{here}/target/bench/fakeapi"
HZ = os.sysconf("SC_CLK_TCK")

WATCHER = r'''
import socket, struct, sys, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)   # NETLINK_NETFILTER
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)               # SO_RCVBUFFORCE
s.bind((0, 1 << (7 - 1)))                                   # NFNLGRP_NFTABLES
buf = bytearray(1 << 20)                                    # once: no 1 MiB allocation per datagram
print("ready", flush=True)
while True:
    try:
        n = s.recv_into(buf)
    except OSError:
        continue
    now = time.time_ns()
    data = bytes(buf[:n])
    i = data.find(b"\x0a\xff")
    seen = set()
    while i >= 0:
        seen.add(data[i:i + 4])
        i = data.find(b"\x0a\xff", i + 1)
    for a in seen:
        if len(a) == 4:
            print(now, ".".join(str(b) for b in a), flush=True)
'''

# The bench's own stand-ins (the fake API server, the kernel's listener) run SCHED_FIFO, as if
# on machines of their own: on two shared cores they otherwise waited up to 12 ms for a CPU
# per change (perf sched, BENCHMARKS.md), charged to kproxy. Their work is still measured, and
# kproxy (and everything else) keeps its own priority. BENCH_RT=0: as before.
RT = ["chrt", "-f", "10"] if os.environ.get("BENCH_RT", "1") != "0" else []

def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)

def gen(d, n):
    with open(f"{d}/node.yaml", "w") as f:
        f.write("apiVersion: v1\nkind: Node\nmetadata: {name: bench-node}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n")
    with open(f"{d}/services.yaml", "w") as f:
        for i in range(n):
            ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
            kind = "NodePort" if i % 10 == 0 else "ClusterIP"
            np = f", nodePort: {30000 + i // 10}" if kind == "NodePort" else ""
            f.write(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n"
                    f"spec: {{type: {kind}, clusterIP: {ip}{sticky(i)}, ports: [{{name: http, port: 80{np}}}]}}\n")
    with open(f"{d}/slices.yaml", "w") as f:
        for i in range(n - 1):
            f.write(slice_doc(i, [ep_ip(i * M + j) for j in range(M)]))

def ep_ip(k):
    return f"10.{128 + k // 65536}.{(k // 256) % 256}.{k % 256}"

def slice_doc(i, ips, trigger=None):
    eps = ", ".join(f"{{addresses: [{ip}], nodeName: n{j % 3}, conditions: {{ready: true}}}}" for j, ip in enumerate(ips))
    ann = f", annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{trigger}'}}" if trigger else ""
    return (f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
            f"labels: {{kubernetes.io/service-name: svc-{i}}}{ann}}}\naddressType: IPv4\n"
            f"ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")

def metric(ns, name):
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "2", "http://127.0.0.1:10249/metrics"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        p = line.split()
        if len(p) == 2 and p[0] == name:
            return float(p[1])
    return None

def wait_metric(ns, name, at_least, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        v = metric(ns, name)
        if v is not None and v >= at_least:
            return v
        if proc.poll() is not None:
            raise SystemExit(f"kproxy exited: {proc.returncode}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {name}")

def cpu_split(pid):
    """(user, system) ticks of `pid`."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])

def cpu_ns(pid):
    """Nanoseconds on a CPU of `pid`'s threads (schedstat: not rounded to the 10 ms tick)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
        except (OSError, ValueError):
            pass  # a thread that ended between the listing and the read
    return total

# The processes on a change's path, per run: kproxy, the fake API server, the listener.
PIDS = {}

def steal_ticks():
    """The machine's stolen time (ticks): time the hypervisor ran something else while a vCPU
    of this guest had work."""
    return int(open("/proc/stat").readline().split()[8])

def sched_of(pid):
    """(ns on a CPU, ns runnable but waiting for one) of `pid`'s threads (schedstat)."""
    run = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for t in tasks:
        try:
            f = open(f"/proc/{pid}/task/{t}/schedstat").read().split()
            run, wait = run + int(f[0]), wait + int(f[1])
        except (OSError, ValueError, IndexError):
            pass
    return run, wait

def probe():
    """What a change's samples are compared by: steal, and each process's CPU and run-queue wait."""
    return dict(steal=steal_ticks(), **{name: sched_of(pid) for name, pid in PIDS.items()})

def loadavg():
    return float(open("/proc/loadavg").read().split()[0])

def cpu_ticks(pid):
    # utime + stime + cutime + cstime: the nft -f writer's nft processes (where its kernel
    # commits run) count, as the netlink writer's commits in its own sendmsg do.
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])

def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0

def log_times(path, pattern):
    """Timestamps (ns) of log lines matching `pattern`."""
    out = []
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    for line in open(path, errors="replace"):
        line = ansi.sub("", line)
        if pattern in line:
            ts = line.split()[0]
            t = datetime.datetime.strptime(ts[:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            out.append((int(t.timestamp() * 1e9), line))
    return out

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

class FakeApi:
    """The fake API server in namespace `ns`, serving the objects of `d`."""
    def __init__(self, d, ns):
        self.d = d
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *RT, FAKEAPI, f"{d}/node.yaml", f"{d}/services.yaml", f"{d}/slices.yaml",
                                      f"{d}/last-slice.yaml"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), self.url
    def apply(self, path):
        """Applies the file; the time (ns) it was handed to the fake (which parses and stores it,
        and notifies its watches, before it answers)."""
        t0 = time.time_ns()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("applied"), line
        return t0
    def stop(self):
        self.proc.kill()
        self.proc.wait()

class Run:
    """kproxy in a fresh namespace, watching `api` (or over manifest dir `d`)."""
    def __init__(self, binary, d, ns, sync_period, log, api=None):
        self.ns, self.log = ns, log
        env = dict(os.environ, RUST_LOG="info,kproxy::dataplane::nftables=debug")
        if full_checks and sync_period == "4s":
            # The hourly check of the whole table, every 4 s.
            env["KPROXY_NFTABLES_FULL_CHECK_PERIOD"] = "4"
        src = ["--master", api.url] if api else ["--manifests", d]
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, binary, *src, "--hostname-override", "bench-node",
                                      "--proxy-mode", "nftables", "--cluster-cidr", "10.128.0.0/9", "--min-sync-period", "0s",
                                      "--sync-period", sync_period, "--ingress-http-bind-address", "", "--ingress-https-bind-address", "",
                                      "--healthz-bind-address", "127.0.0.1:10256"],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "a"), env=env)
    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

class Watcher:
    def __init__(self, ns):
        self.seen, self.cv = {}, threading.Condition()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *RT, "python3", "-c", WATCHER], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        threading.Thread(target=self.read, daemon=True).start()
    def read(self):
        for line in self.proc.stdout:
            t, a = line.split()
            with self.cv:
                self.seen.setdefault(a, int(t))
                self.cv.notify_all()
    def wait(self, addr, timeout=180):
        end = time.time() + timeout
        with self.cv:
            while addr not in self.seen:
                left = end - time.time()
                if left <= 0:
                    return None
                self.cv.wait(left)
            return self.seen[addr]
    def stop(self):
        self.proc.kill()
        self.proc.wait()

class ForeignWriter:
    """Another nftables writer in the node's namespace, committing every half second, as on a
    node where a CNI or firewall also writes nftables. Each commit moves the ruleset
    generation. By default (check, with the whole check every 4 s, and own-socket) it commits
    a table of its own (created and deleted in one transaction) through one `nft -i` process:
    kproxy's notifications show that its table was not touched, so its periodic syncs list
    nothing for it. BENCH_FOREIGN=own does the same through an `nft` process per commit. With BENCH_FOREIGN=kproxy it adds and deletes a chain in kproxy's
    table instead: every periodic sync then starts a check that lists kproxy's table and
    compares it (a chain: a check of that chain only). BENCH_FOREIGN=kproxy-set adds and
    deletes a set in kproxy's table: a set's declaration is checked by listing the whole table,
    as the hourly full check does, so every periodic sync lists it. The `nft -i` process keeps its netlink socket (a daemon writer): no
    socket is closed after each commit, which the kernel answers by taking its commit mutex
    for an RCU grace period (BENCH_FOREIGN=own shows what that costs every writer).
    BENCH_FOREIGN=0 and full leave it out."""
    def __init__(self, ns):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(ns,), daemon=True)
        if foreign_mode not in ("0", "full"):
            self.thread.start()

    def run(self, ns):
        script = {"kproxy": "add chain ip kproxy bench-foreign; delete chain ip kproxy bench-foreign",
                  "kproxy-set": "add set ip kproxy bench-foreign { type ipv4_addr; }; delete set ip kproxy bench-foreign",
                  }.get(foreign_mode, "add table ip bench-foreign; delete table ip bench-foreign")
        if foreign_mode in ("own-socket", "check"):
            nft = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-i"], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
            while not self.stop.is_set():
                # One line, one transaction, on the same socket.
                nft.stdin.write(script + "\n")
                nft.stdin.flush()
                self.stop.wait(0.5)
            nft.stdin.close()
            nft.wait()
            return
        while not self.stop.is_set():
            subprocess.run(["ip", "netns", "exec", ns, "nft", script],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.stop.wait(0.5)

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

def change_loop(d, n, watcher, log, start_k, count, api=None):
    """`count` changes of the last Service's slice, one endpoint each; per change
    (source->kernel ms, t_source_ns, t_kernel_ns): from the fake API's store (with `api`) or
    the file's rename."""
    i = n - 1
    ips = [ep_ip(i * M + j) for j in range(M)]
    results = []
    for c in range(count):
        k = start_k + c
        new = f"10.255.{k // 250}.{1 + k % 250}"
        ips[k % M] = new
        tmp = f"{d}/.last.tmp"
        open(tmp, "w").write(slice_doc(i, ips, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
        before = probe()
        if api:
            os.rename(tmp, f"{d}/change.yaml")
            t0 = api.apply(f"{d}/change.yaml")
        else:
            t0 = time.time_ns()
            os.rename(tmp, f"{d}/last-slice.yaml")
        results.append(arrival(watcher, log, new, t0, before))
    return results

def arrival(watcher, log, address, t0, before=None):
    """Waits for `address` in the kernel, then pauses before the next change; (API->kernel ms,
    t0, t1, what `probe` saw change from before the change to its arrival)."""
    t1 = watcher.wait(address)
    if t1 is None:
        raise SystemExit(f"{address} never reached the kernel; see {log}")
    seen = None
    if before is not None:
        after = probe()
        seen = {k: (after[k] - before[k] if k == "steal" else [after[k][0] - before[k][0], after[k][1] - before[k][1]]) for k in after}
    time.sleep(random.uniform(0.15, 0.35))
    return ((t1 - t0) / 1e6, t0, t1, seen)

def scale_loop(d, n, watcher, log, count, api):
    """`count` changes of the endpoint count of the second-to-last Service (10 -> 11 -> 10 ...),
    each with a new address; per change (API->kernel ms, t0, t1)."""
    i = n - 2
    ips = [ep_ip(i * M + j) for j in range(M)]
    results = []
    for c in range(count):
        new = f"10.255.{200 + c // 250}.{1 + c % 250}"
        ips = ips + [new] if len(ips) == M else ips[2:] + [new]
        open(f"{d}/change.yaml", "w").write(slice_doc(i, ips))
        t0 = api.apply(f"{d}/change.yaml")
        results.append(arrival(watcher, log, new, t0))
    return results

def new_service_loop(d, n, watcher, log, count, api):
    """`count` new Services (with 10 endpoints each), one at a time; per Service (API->kernel
    ms of its cluster IP, t0, t1)."""
    results = []
    for c in range(count):
        cip = f"10.255.{220 + c // 250}.{1 + c % 250}"
        name = f"new-{c}"
        doc = (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n"
               f"spec: {{type: ClusterIP, clusterIP: {cip}, ports: [{{name: http, port: 80}}]}}\n")
        doc += slice_doc(n + c, [ep_ip((n + c) * M + j) for j in range(M)]).replace(f"svc-{n + c}", name)
        open(f"{d}/change.yaml", "w").write(doc)
        t0 = api.apply(f"{d}/change.yaml")
        results.append(arrival(watcher, log, cip, t0))
    return results

def source_latencies(log, results):
    """kernel time minus the first 'loaded manifests' log line after each file write."""
    loads = [t for t, _ in log_times(log, "loaded manifests")]
    out = []
    for _, t0, t1, *_ in results:
        after = [t for t in loads if t >= t0 - 2_000_000]   # log stamps are microseconds
        if after and after[0] <= t1:
            out.append((t1 - after[0]) / 1e6)
    return out

def busy_windows(log):
    """(start, end) ns of periodic full syncs and nftables checks, from the log."""
    w = []
    for t, line in log_times(log, "synced full proxy rules"):
        m = re.search(r"duration_ms=([0-9.]+)", line)
        if m:
            w.append((t - int(float(m.group(1)) * 1e6), t))
    for t, line in log_times(log, "nftables check"):
        # The whole check (listing, comparison, repair) where the line says; else the listing.
        m = re.search(r"check_ms=([0-9.]+)", line) or re.search(r"listed_ms=([0-9.]+)", line)
        if m:
            w.append((t - int(float(m.group(1)) * 1e6), t))
    return w[1:] if w else w   # the first full sync is the cold start

rows = []
work = tempfile.mkdtemp(prefix="kproxy-bench-nft.")
print(f"==> kproxy's logs and every change's samples ({{writer}}-{{n}}-changes.json) in {work}", flush=True)

class PerfSched:
    """With BENCH_PERF_SCHED=1, `perf sched record` of the whole machine over one phase (every
    switch and wake-up: who waited for what), to {work}/{name}.perf, its clock CLOCK_MONOTONIC
    (the changes' file gives `realtime_minus_monotonic_ns` to match them)."""
    def __init__(self, name):
        self.proc = None
        if os.environ.get("BENCH_PERF_SCHED") == "1":
            self.proc = subprocess.Popen(["perf", "sched", "record", "-k", "monotonic", "-a", "-o", f"{work}/{name}.perf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait()

def stages(perf, results, pids, out):
    """Where each change's time went, from a PerfSched recording: its path is a chain of
    wake-ups (the fake API wakes kproxy's watch; a thread of kproxy wakes the listener with the
    commit's notification). Per change, in ms: `fake` (t0 to kproxy woken), `kproxy` (to the
    listener woken), `listener` (to its time stamp), `run_queue` (kproxy's threads runnable but
    waiting for a CPU on that path), and who else woke kproxy's threads in between (a task
    holding a kernel lock kproxy waited for). Written to `out`; the slowest printed."""
    lines = subprocess.run(["perf", "sched", "timehist", "-w", "-i", perf], capture_output=True, text=True).stdout.splitlines()
    wake, runs = [], {}
    ev = re.compile(r"\s*([0-9.]+)\s+\[\d+\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+")
    for line in lines:
        m = ev.match(line)
        if not m:
            continue
        t, pid = float(m.group(1)), int(m.group(4) or m.group(3))
        rest = line[m.end():]
        w = re.match(r"awakened: (.+?)\[(\d+)(?:/(\d+))?\]", rest)
        if w:
            wake.append((t, m.group(2).strip(), pid, int(w.group(2)), int(w.group(3) or w.group(2))))
        elif len(rest.split()) == 3:
            runs.setdefault(int(m.group(3)), []).append((t, float(rest.split()[2]) / 1e3))
    def queued(tid, since):
        """How long `tid`, woken at `since`, waited to run."""
        for t, ran in runs.get(tid, []):
            if t >= since:
                return max(0.0, t - ran - since)
        return 0.0
    off = time.time_ns() - time.monotonic_ns()
    rows = []
    for x, t0, t1, _ in results:
        a, b = (t0 - off) / 1e9, (t1 - off) / 1e9
        ws = [w for w in wake if a <= w[0] <= b]
        kproxy_pid = pids["kproxy"]
        into = [w for w in ws if w[4] == kproxy_pid]
        first = next((w for w in into if w[2] == pids["fakeapi"]), None)
        last = first and next((w for w in ws if w[0] >= first[0] and w[2] == kproxy_pid and w[4] == pids["listener"]), None)
        if not last:
            continue
        inner = [w for w in into if first[0] <= w[0] <= last[0]]
        rows.append(dict(ms=x, fake=(first[0] - a) * 1e3, kproxy=(last[0] - first[0]) * 1e3, listener=(b - last[0]) * 1e3,
                         run_queue=sum(queued(w[3], w[0]) for w in inner) * 1e3,
                         woken_by=sorted({w[1] for w in inner if w[2] != kproxy_pid and w is not first})))
    json.dump(rows, open(out, "w"))
    if rows:
        med = lambda k: statistics.median(r[k] for r in rows)
        print(f"    where the time went ({len(rows)} of {len(results)} changes traced), median: fake {med('fake'):.2f}, "
              f"kproxy {med('kproxy'):.2f} (run queue {med('run_queue'):.2f}), listener {med('listener'):.2f} ms; slowest:", flush=True)
        for r in sorted(rows, key=lambda r: -r["ms"])[:5]:
            print(f"      {r['ms']:.2f} ms: fake {r['fake']:.2f}, kproxy {r['kproxy']:.2f} (run queue {r['run_queue']:.2f}"
                  + (f"; woken by {', '.join(r['woken_by'])}" if r["woken_by"] else "") + f"), listener {r['listener']:.2f}", flush=True)

for n in sizes:
    d = f"{work}/m{n}"
    os.makedirs(d)
    gen(d, n)
    for label, binary in writers:
        changes = nftf_changes if label == "nft -f" else changes_arg
        ns = f"kpbn{os.getpid()}"
        log = f"{work}/{label.replace(' ', '')}-{n}.log"
        open(f"{d}/last-slice.yaml", "w").write(slice_doc(n - 1, [ep_ip((n - 1) * M + j) for j in range(M)]))
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run = watcher = api = None
        try:
            load0 = loadavg()
            if source == "api":
                api = FakeApi(d, ns)
            print(f"==> {n} Services, {label}, from {source}: first full sync", flush=True)
            run = Run(binary, d, ns, "1h", log, api)
            wait_metric(ns, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", 1, run.proc, 3600)
            full_s = metric(ns, "kubeproxy_sync_full_proxy_rules_duration_seconds_sum")
            rss = rss_mib(run.proc.pid)
            watcher = Watcher(ns)
            PIDS.clear()
            PIDS.update(kproxy=run.proc.pid, listener=watcher.proc.pid, **({"fakeapi": api.proc.pid} if api else {}))
            time.sleep(1)
            idle0, idle0_ns, tidle = cpu_split(run.proc.pid), cpu_ns(run.proc.pid), time.time()
            time.sleep(3)
            idle1, idle1_ns = cpu_split(run.proc.pid), cpu_ns(run.proc.pid)
            idle_rate = [(idle1[k] - idle0[k]) / HZ / (time.time() - tidle) for k in (0, 1)]
            idle_ns_rate = (idle1_ns - idle0_ns) / 1e9 / (time.time() - tidle)
            print(f"    {changes} changes, no resync", flush=True)
            c0, c0_ns, tc = cpu_split(run.proc.pid), cpu_ns(run.proc.pid), time.time()
            perf = PerfSched(f"{label.replace(' ', '')}-{n}-plain")
            a = change_loop(d, n, watcher, log, 0, changes, api)
            perf.stop()
            if perf.proc:
                stages(f"{work}/{label.replace(' ', '')}-{n}-plain.perf", a, PIDS, f"{work}/{label.replace(' ', '')}-{n}-plain-stages.json")
            c1, c1_ns, took = cpu_split(run.proc.pid), cpu_ns(run.proc.pid), time.time() - tc
            cpu = [((c1[k] - c0[k]) / HZ - idle_rate[k] * took) / changes * 1000 for k in (0, 1)]
            cpu_exact = ((c1_ns - c0_ns) / 1e9 - idle_ns_rate * took) / changes * 1000
            src_a = [x[0] for x in a] if api else source_latencies(log, a)
            scale = new = [0.0]
            if api:
                print("    20 endpoint-count changes, 10 new Services", flush=True)
                scale = [x[0] for x in scale_loop(d, n, watcher, log, 20, api)]
                new = [x[0] for x in new_service_loop(d, n, watcher, log, 10, api)]
            run.stop()
            print(f"    {changes} changes, --sync-period 4s", flush=True)
            run = Run(binary, d, ns, "4s", log, api)
            wait_metric(ns, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", 1, run.proc, 3600)
            t_start = time.time_ns()
            foreign = ForeignWriter(ns)
            PIDS.update(kproxy=run.proc.pid)
            perf = PerfSched(f"{label.replace(' ', '')}-{n}-resync")
            b = change_loop(d, n, watcher, log, changes, changes, api)
            perf.stop()
            if perf.proc:
                stages(f"{work}/{label.replace(' ', '')}-{n}-resync.perf", b, PIDS, f"{work}/{label.replace(' ', '')}-{n}-resync-stages.json")
            foreign.close()
            # Let the resync in progress (if any) finish, so its log line is there.
            time.sleep(1)
            src_b = [x[0] for x in b] if api else source_latencies(log, b)
            windows = [w for w in busy_windows(log) if w[1] >= t_start]
            is_during = lambda t0, t1: any(s <= t0 <= e or s <= t1 <= e for s, e in windows)
            during_ms = sorted(x for x, t0, t1, _ in b if is_during(t0, t1))
            # Every change's samples, for a look at the slow ones (with kproxy's log beside it).
            with open(f"{work}/{label.replace(' ', '')}-{n}-changes.json", "w") as out:
                json.dump([dict(realtime_minus_monotonic_ns=time.time_ns() - time.monotonic_ns())] + [dict(phase="plain", ms=x, t0=t0, t1=t1, seen=seen) for x, t0, t1, seen in a]
                          + [dict(phase="resync", ms=x, t0=t0, t1=t1, seen=seen, during=is_during(t0, t1)) for x, t0, t1, seen in b], out)
            during = len(during_ms)
            waits = [float(m.group(1)) for t, line in log_times(log, "waited for the planner's lock") if t >= t_start
                     for m in [re.search(r"waited_ms=([0-9.]+)", line)] if m]
            resyncs = len([w for w in windows if w[0] <= b[-1][2]])
            run.stop()
            load1 = loadavg()
            rows.append(dict(n=n, writer=label, source=source, full_s=full_s, rss=rss, cpu_user=cpu[0], cpu_sys=cpu[1], cpu_exact=cpu_exact,
                             a_src=[pct(src_a, 50), pct(src_a, 99), max(src_a)],
                             b_src=[pct(src_b, 50), pct(src_b, 99), max(src_b)],
                             scale=[pct(scale, 50), max(scale)], new=[pct(new, 50), max(new)],
                             changes=changes, during=during, during_ms=during_ms, lock_waits=sorted(waits), resyncs=resyncs, samples=(len(src_a), len(src_b)), load=(load0, load1)))
            print("    " + json.dumps(rows[-1]), flush=True)
        finally:
            if watcher:
                watcher.stop()
            if run and run.proc.poll() is None:
                run.stop()
            if api:
                api.stop()
            subprocess.run(["ip", "netns", "del", ns])

# Rows of writers not measured in this run are kept from BENCHMARKS.md (the nft -f writer's,
# measured in round 1 from manifest files).
path = f"{here}/BENCHMARKS.md"
text = open(path).read()
begin, end = f"<!-- scripts/bench-nftables.sh{tag}: begin -->", f"<!-- scripts/bench-nftables.sh{tag}: end -->"
measured = {r["writer"] for r in rows}
kept = []
if begin in text:
    old_section = text.split(begin, 1)[1].split(end, 1)[0]
    for line in old_section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[0].replace(",", "").isdigit():
            continue
        if cells[1] in measured and len(cells) == 10:
            # The previous run of the same writer, kept under the label PREVIOUS names, to show
            # the gain of what changed since.
            prev = os.environ.get("PREVIOUS", "round 3 before the pipelined cold start")
            line = line.replace(f"| {cells[1]} |", f"| {cells[1]} ({prev}) |", 1)
            cells[1] += f" ({prev})"
        elif cells[1] in measured:
            if len(cells) != 8:
                continue
            # Round 1's netlink writer (per-endpoint rules), kept to show the layout's gain.
            line = line.replace(f"| {cells[1]} |", f"| {cells[1]} (round 1) |", 1)
            cells[1] += " (round 1)"
        nums = lambda c: [float(x) for x in re.findall(r"[0-9.]+", c.split("ms")[0])]
        if len(cells) == 8:
            # Round 1's columns: n, writer, full, source->kernel, file->kernel, with resyncs, CPU, memory.
            kept.append(dict(n=int(cells[0].replace(",", "")), writer=cells[1], line=line, a_src=nums(cells[3]), b_src=nums(cells[5])))
        else:
            kept.append(dict(n=int(cells[0].replace(",", "")), writer=cells[1], line=line, a_src=nums(cells[3]), b_src=nums(cells[4])))

# The plot: change latency (source -> kernel) against the number of Services, both writers.
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(7, 4.2))
previous = "netlink (" + os.environ.get("PREVIOUS", "round 3 before the pipelined cold start") + ")"
for label, style in [("netlink", "-o"), (previous, "-.d"), *([(baseline, "-x")] if baseline else []), ("netlink (round 2)", "-.v"), ("netlink (round 1)", "-.^"), ("nft -f", "--s")]:
    rs = sorted([r for r in rows + kept if r["writer"] == label], key=lambda r: r["n"])
    xs = [r["n"] for r in rs]
    ax.plot(xs, [r["a_src"][1] for r in rs], style, label=f"{label}: p99")
    ax.plot(xs, [r["a_src"][0] for r in rs], style, alpha=0.5, label=f"{label}: median")
    ax.plot(xs, [r["b_src"][1] for r in rs], marker=style[-1], alpha=0.8, linestyle=":", label=f"{label}: p99 with resyncs every 4 s")
ax.set_yscale("log")
ax.axhline(10, color="grey", linewidth=0.8)
ax.set_xlabel("Services (x 10 endpoints)")
ax.set_ylabel("one EndpointSlice change -> kernel (ms)")
ax.set_title("kproxy nftables mode: netlink writer (rounds 1-3) vs nft -f (round 1, manifest files)")
ax.legend(fontsize=7)
fig.tight_layout()
os.makedirs(f"{here}/docs", exist_ok=True)
fig.savefig(f"{here}/docs/bench-nftables{tag}.png", dpi=110)

cpu = open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip()
f = lambda x: f"{x:.1f}"
src_word = "API -> kernel" if source == "api" else "source -> kernel"
resync_word = {"check": "with the hourly check of the whole table every 4 s (KPROXY_NFTABLES_FULL_CHECK_PERIOD=4), resyncs every 4 s, and another writer committing a table of its own every 0.5 s through one socket it keeps (`nft -i`)",
               "own": "with resyncs every 4 s and another writer in a table of its own, an `nft` process per commit (a resync lists kproxy's table only if its notifications show a commit into it)",
               "kproxy": "with resyncs every 4 s and another writer in kproxy's table (each resync checks what it touched)",
               "kproxy-set": "with resyncs every 4 s and another writer declaring a set in kproxy's table (each resync lists the whole table, as the hourly check does)",
               "full": "with the hourly check of the whole table every 4 s (KPROXY_NFTABLES_FULL_CHECK_PERIOD=4) and no other writer",
               "own-socket": "with resyncs every 4 s and another writer in a table of its own, through one socket it keeps (`nft -i`)",
               "0": "with resyncs every 4 s"}[foreign_mode]
lines = [
    f"Written by `scripts/bench-nftables.sh` on {datetime.date.today()} ({os.cpu_count()} cores, {cpu}; kernel {os.uname().release}),",
    f"{changes_arg} changes per row and phase"
    + (f" ({nftf_changes} for the nft -f writer, measured in the same run)" if any(r["writer"] == "nft -f" for r in rows) else "")
    + ", one endpoint replaced per change, "
    + ("through the fake API server (kproxy watching it)" if source == "api" else "from manifest files")
    + ((", every Service with session affinity" if affinity_every == 1 else f", every {affinity_every}th Service with session affinity (not the changed ones)") if affinity else "") + ". Single runs on a shared",
    f"machine (its load average is in the table): rerun the script to compare. Plot: [docs/bench-nftables{tag}.png](docs/bench-nftables{tag}.png).",
    "",
    f"| Services x 10 | writer | first full sync | change: {src_word}, median / p99 / max | {resync_word}: median / p99 / max (changes during a listing or resync) | kproxy CPU per change, user + system (all threads' schedstat, ns resolution) | endpoint count changes: median / max | new Service: median / max | memory after first sync | load average |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in sorted(rows, key=lambda r: r["n"]):
    lines.append(f"| {r['n']:,} | {r['writer']} | {r['full_s']:.2f} s | {' / '.join(f(x) for x in r['a_src'])} ms | "
                 f"{' / '.join(f(x) for x in r['b_src'])} ms ({r['during']} of {r['changes']}, {r['resyncs']} resyncs"
                 + (f"; those: median {f(pct(r['during_ms'], 50))}, p99 {f(pct(r['during_ms'], 99))}, max {f(max(r['during_ms']))} ms" if r['during_ms'] else "")
                 + (f"; {len(r['lock_waits'])} syncs waited >= 1 ms for the lock, longest {f(max(r['lock_waits']))} ms" if r['lock_waits'] else "")
                 + ") | "
                 f"{r['cpu_user']:.2f} + {r['cpu_sys']:.2f} ms ({r['cpu_exact']:.2f} ms by schedstat) | {' / '.join(f(x) for x in r['scale'])} ms | {' / '.join(f(x) for x in r['new'])} ms | "
                 f"{r['rss']} MiB | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
kept10 = [k for k in kept if k["line"].count("|") == 11]
kept = [k for k in kept if k["line"].count("|") != 11]
if kept10:
    lines += ["", "Kept from the previous runs of this script (each labelled by what it measured; round 2: a chain per Service; before round 9 (nf_tables' notifications) every resync with another writer listed the whole table, whatever table that writer wrote; before round 10 the resync phase had no whole check, and its other writer started an `nft` process per commit):", "", lines[4], lines[5]]
    lines += [k["line"] for k in sorted(kept10, key=lambda k: k["n"])]
if kept:
    lines += ["", "Kept from an earlier run of this script (other columns: first full sync, source -> kernel, file -> kernel, with resyncs, CPU, memory):", "",
              "| Services x 10 | writer | first full sync | change: source -> kernel, median / p99 / max | change: file -> kernel, median / p99 | with resyncs every 4 s: source -> kernel, median / p99 / max (changes during a resync) | kproxy CPU per change | memory after first sync |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [k["line"] for k in sorted(kept, key=lambda k: k["n"])]
lines += [
    "",
    f"{src_word}: from the moment the changed EndpointSlice was handed to the fake API server"
    if source == "api" else "source -> kernel: from kproxy's manifest source logging that it loaded the changed file",
    "to the commit's netlink notification carrying the new address (a listener on NFNLGRP_NFTABLES",
    "in the node's namespace)." + (" The fake API server and the listener run SCHED_FIFO, so that their own waits" if RT else ""),
    *(["for a CPU are not charged to kproxy (kproxy and the other writer keep normal priorities)."] if RT else []),
    "kproxy CPU per change: its user and system time over the changes,",
    "less its idle rate, divided by the changes; the kernel's commit runs in kproxy's sendmsg, so the",
    "system time is the kernel's side. The nft -f writer is commit 9823b8b (its CPU includes its nft",
    "processes). Endpoint count changes: the second-to-last Service goes from 10 to 11 endpoints and",
    "back, a new address each time (20 changes); new Service: a Service and its EndpointSlice",
    "created together, until its cluster IP is in the kernel (10 Services).",
]
section = "\n".join(lines)
if begin not in text:
    title = ("nftables mode: netlink writer" + (", session affinity" if affinity else "")
             + {"own": ", another writer starting an nft process per commit", "kproxy": ", another writer in kproxy's table", "kproxy-set": ", another writer's sets in kproxy's table (whole listings)", "full": ", the hourly full check every 4 s", "own-socket": ", another writer keeping its socket"}.get(foreign_mode, ""))
    text += f"\n## {title}\n\n{begin}\n{end}\n"
head, _, tail = text.partition(begin)
_, _, tail = tail.partition(end)
open(path, "w").write(head + begin + "\n" + section + "\n" + end + tail)
print(section)
PY
