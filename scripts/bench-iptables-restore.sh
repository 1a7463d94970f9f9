#!/usr/bin/env bash
# Benchmark: the cost of kproxy's iptables-restore input against kube-proxy's for the same
# state. Renders kproxy's input (`kproxy render`, IPv4 part) for bench.sh's N Services x M
# endpoints, writes the input kube-proxy v1.33 would write for the same Services (large
# cluster mode, its chain order), and restores each into a fresh network namespace ROUNDS
# times, alternating, with the given iptables-restore (legacy by default). Prints the CPU
# time of each run and the median. Never run by the tests.
#
# KERNEL=1 also times the kernel alone on each restored nat table: a small C program (built
# with gcc) reads it (IPT_SO_GET_ENTRIES) and writes it back unchanged (IPT_SO_SET_REPLACE), what
# the legacy backend makes the kernel do for any change, however small. KPROXY=PATH uses that
# kproxy binary instead of building one (the release profile is a fat-LTO build).
#
# usage: sudo [KERNEL=1] [KPROXY=PATH] scripts/bench-iptables-restore.sh [SERVICES] [ENDPOINTS] [ROUNDS] [RESTORE]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
services=${1:-10000}
endpoints=${2:-10}
rounds=${3:-3}
restore=${4:-iptables-legacy-restore}
[ "$(id -u)" = 0 ] || { echo "bench-iptables-restore.sh: needs root" >&2; exit 1; }

kproxy=${KPROXY:-$here/target/release/kproxy}
[ -n "${KPROXY:-}" ] || cargo build --quiet --release --manifest-path "$here/Cargo.toml"
work=$(mktemp -d /tmp/kproxy-restore.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
if [ -n "${KERNEL:-}" ]; then
  cat > "$work/replace.c" <<'C'
/* Reads the nat table and writes it back unchanged; prints each call's wall time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/netfilter_ipv4/ip_tables.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(void) {
  int s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
  struct ipt_getinfo info = {.name = "nat"};
  socklen_t len = sizeof info;
  if (s < 0 || getsockopt(s, IPPROTO_IP, IPT_SO_GET_INFO, &info, &len)) { perror("nat table"); return 1; }
  struct ipt_get_entries *e = calloc(1, sizeof *e + info.size);
  strcpy(e->name, "nat"); e->size = info.size; len = sizeof *e + info.size;
  double t0 = now();
  if (getsockopt(s, IPPROTO_IP, IPT_SO_GET_ENTRIES, e, &len)) { perror("GET_ENTRIES"); return 1; }
  double t1 = now();
  struct ipt_replace *r = calloc(1, sizeof *r + info.size);
  strcpy(r->name, "nat"); r->valid_hooks = info.valid_hooks; r->num_entries = info.num_entries; r->size = info.size;
  memcpy(r->hook_entry, info.hook_entry, sizeof r->hook_entry); memcpy(r->underflow, info.underflow, sizeof r->underflow);
  r->num_counters = info.num_entries; r->counters = calloc(info.num_entries, sizeof(struct xt_counters));
  memcpy(r->entries, e->entrytable, info.size);
  double t2 = now();
  if (setsockopt(s, IPPROTO_IP, IPT_SO_SET_REPLACE, r, sizeof *r + info.size)) { perror("SET_REPLACE"); return 1; }
  double t3 = now();
  printf("%u entries, %u bytes: GET_ENTRIES %.3f s, SET_REPLACE %.3f s\n", info.num_entries, info.size, t1 - t0, t3 - t2);
  return 0;
}
C
  gcc -O2 -o "$work/replace" "$work/replace.c"
fi

python3 - "$work" "$services" "$endpoints" <<'PY'
import sys, hashlib, base64, random
out, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = lambda i: f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
ep = lambda k: f"10.{128 + k // 65536}.{(k // 256) % 256}.{k % 256}"
# The manifests bench.sh uses: every tenth Service a NodePort, endpoints over three nodes.
with open(f"{out}/node.yaml", "w") as f:
    f.write("apiVersion: v1\nkind: Node\nmetadata: {name: bench-node}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n")
with open(f"{out}/objects.yaml", "w") as f:
    for i in range(n):
        kind = "NodePort" if i % 10 == 0 else "ClusterIP"
        np = f", nodePort: {30000 + i // 10}" if kind == "NodePort" else ""
        f.write(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n"
                f"spec: {{type: {kind}, clusterIP: {ip(i)}, ports: [{{name: http, port: 80{np}}}]}}\n")
        eps = ", ".join(f"{{addresses: [{ep(i * m + j)}], nodeName: n{j % 3}, conditions: {{ready: true}}}}" for j in range(m))
        f.write(f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
                f"labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\n"
                f"ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")

# What kube-proxy v1.33's iptables proxier writes for the same state on its first sync
# (pkg/proxy/iptables/proxier.go: filter chains and rules, then nat: every chain line, then
# the rules in Service order, a Go map's random order; no per-endpoint comments above 1000
# endpoints; --cluster-cidr 10.128.0.0/9 as bench.sh passes).
def h(s):
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]
order = list(range(n))
random.Random(1).shuffle(order)
chains, rules = [], []
large = n * m > 1000
for i in order:
    spn = f"bench/svc-{i}:http"
    svc, ext = "KUBE-SVC-" + h(spn + "tcp"), "KUBE-EXT-" + h(spn + "tcp")
    nodeport = 30000 + i // 10 if i % 10 == 0 else None
    eps = sorted(ep(i * m + j) for j in range(m))
    seps = ["KUBE-SEP-" + h(spn + "tcp" + f"{e}:8080") for e in eps]
    rules.append(f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" -m tcp -p tcp -d {ip(i)} --dport 80 -j {svc}')
    if nodeport:
        rules.append(f"-A KUBE-NODEPORTS -m comment --comment {spn} -m tcp -p tcp --dport {nodeport} -j {ext}")
    rules.append(f'-A {svc} -m comment --comment "{spn} cluster IP" -m tcp -p tcp -d {ip(i)} --dport 80 ! -s 10.128.0.0/9 -j KUBE-MARK-MASQ')
    if nodeport:
        chains.append(ext)
        rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {spn} external destinations" -j KUBE-MARK-MASQ')
        rules.append(f"-A {ext} -j {svc}")
    chains.append(svc)
    for k, (e, sep) in enumerate(zip(eps, seps)):
        c = "" if large else f' -m comment --comment "{spn} -> {e}:8080"'
        if k < m - 1:
            rules.append(f"-A {svc}{c} -m statistic --mode random --probability {1.0 / (m - k):.10f} -j {sep}")
        else:
            rules.append(f"-A {svc}{c} -j {sep}")
    for e, sep in zip(eps, seps):
        chains.append(sep)
        c = "" if large else f" -m comment --comment {spn}"
        rules.append(f"-A {sep}{c} -s {e} -j KUBE-MARK-MASQ")
        rules.append(f"-A {sep}{c} -m tcp -p tcp -j DNAT --to-destination {e}:8080")
mark = "0x4000/0x4000"
with open(f"{out}/kube-proxy.txt", "w") as f:
    f.write("*filter\n")
    for c in ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"]:
        f.write(f":{c} - [0:0]\n")
    f.write("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n")
    f.write(f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark} -j ACCEPT\n')
    f.write('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n')
    f.write("COMMIT\n*nat\n")
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] + chains:
        f.write(f":{c} - [0:0]\n")
    f.write(f"-A KUBE-POSTROUTING -m mark ! --mark {mark} -j RETURN\n")
    f.write("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n")
    f.write('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully\n')
    f.write("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n")
    for r in rules:
        f.write(r + "\n")
    f.write('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS\n')
    f.write("COMMIT\n")
PY
mkdir -p "$work/m" && mv "$work/node.yaml" "$work/objects.yaml" "$work/m/"
"$kproxy" render --manifests "$work/m" --hostname-override bench-node \
  --cluster-cidr 10.128.0.0/9 2>/dev/null | awk '/^# ip6tables/ {exit} !/^#/' > "$work/kproxy.txt"

# CPU seconds (user + system) of one restore of FILE into a fresh namespace.
cpu_of() {
  local ns=kprestore$$ cpu
  ip netns add "$ns"
  # bash's `times`, in the subshell that ran the restore: its second line is the children's.
  cpu=$( (ip netns exec "$ns" "$restore" -w 5 --noflush < "$1" || echo "failed" >&2; times) | tail -1 |
    awk '{for (i = 1; i <= 2; i++) {m = $i; sub(/m.*/, "", m); s = $i; sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); t += m * 60 + s}} END {printf "%.2f", t}')
  # The kernel alone on that table (to stderr, beside the CPU figure): twice.
  [ -z "${KERNEL:-}" ] || for _ in 1 2; do echo "  kernel, $(basename "$1" .txt)'s table: $(ip netns exec "$ns" "$work/replace")" >&2; done
  ip netns del "$ns"
  echo "$cpu"
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

printf "%s Services x %s endpoints, %s: %s rules for kube-proxy, %s for kproxy\n" "$services" "$endpoints" \
  "$restore" "$(grep -c '^-A' "$work/kube-proxy.txt")" "$(grep -c '^-[AI]' "$work/kproxy.txt")"
# What each input holds: bytes, chain declarations (each one creates or flushes a chain), rules,
# deletions, and the bytes per rule line.
for who in kube-proxy kproxy; do
  awk -v who="$who" '/^:/ {c++} /^-[AI]/ {r++; rb += length($0) + 1} /^-X/ {x++}
    END {printf "%s input: %d bytes, %d chains declared, %d rules (%.1f bytes each), %d deletions\n", who, bytes, c, r, rb / r, x}' \
    bytes="$(wc -c < "$work/$who.txt")" "$work/$who.txt"
done
for _ in $(seq "$rounds"); do
  echo "kube-proxy $(cpu_of "$work/kube-proxy.txt")" | tee -a "$work/runs"
  echo "kproxy $(cpu_of "$work/kproxy.txt")" | tee -a "$work/runs"
done
for who in kube-proxy kproxy; do
  echo "$who: median $(awk -v w="$who" '$1 == w {print $2}' "$work/runs" | median) s CPU over $rounds runs"
done
