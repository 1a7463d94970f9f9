#!/usr/bin/env bash
# Benchmark: kproxy in a network namespace with N Services x M endpoints (default 5000 x 10),
# from manifest files. Measures the first full sync, one EndpointSlice change (the time from the
# slice's last-change-trigger-time to rules in the kernel, via kproxy's own
# kubeproxy_network_programming_duration_seconds and the partial sync duration), the render
# cost alone (no kernel), and resident memory. Writes the figures to BENCHMARKS.md.
#
# usage: sudo scripts/bench.sh [SERVICES] [ENDPOINTS]     (root: namespaces and iptables)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
services=${1:-5000}
endpoints=${2:-10}
[ "$(id -u)" = 0 ] || { echo "bench.sh: needs root" >&2; exit 1; }

cargo build --quiet --release --manifest-path "$here/Cargo.toml"
kproxy=$here/target/release/kproxy
work=$(mktemp -d /tmp/kproxy-bench.XXXXXX)
ns=kpbench$$
cleanup() {
  set +e
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

echo "==> generating $services Services x $endpoints endpoints"
mkdir -p "$work/m"
python3 - "$work/m" "$services" "$endpoints" <<'PY'
import sys
out, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(f"{out}/node.yaml", "w") as f:
    f.write("apiVersion: v1\nkind: Node\nmetadata: {name: bench-node}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n")
with open(f"{out}/services.yaml", "w") as f:
    for i in range(n):
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        kind = "NodePort" if i % 10 == 0 else "ClusterIP"
        np = f", nodePort: {30000 + i // 10}" if kind == "NodePort" else ""
        f.write(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n"
                f"spec: {{type: {kind}, clusterIP: {ip}, ports: [{{name: http, port: 80{np}}}]}}\n")
def slice_doc(i, first, trigger):
    eps = ", ".join(f"{{addresses: [10.{128 + (i * m + j) // 65536}.{((i * m + j) // 256) % 256}.{(i * m + j) % 256 + first}], "
                    f"nodeName: n{j % 3}, conditions: {{ready: true}}}}" for j in range(m))
    ann = f", annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{trigger}'}}" if trigger else ""
    return (f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
            f"labels: {{kubernetes.io/service-name: svc-{i}}}{ann}}}\naddressType: IPv4\n"
            f"ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")
with open(f"{out}/slices.yaml", "w") as f:
    for i in range(n - 1):
        f.write(slice_doc(i, 0, None))
with open(f"{out}/last-slice.yaml", "w") as f:
    f.write(slice_doc(n - 1, 0, None))
PY

echo "==> render only (parse, convert, render; no kernel)"
start=$(date +%s.%N)
"$kproxy" render --manifests "$work/m" --hostname-override bench-node > "$work/render.txt" 2>/dev/null
render_s=$(echo "$(date +%s.%N) - $start" | bc)
rules=$(grep -c '^-A' "$work/render.txt")

ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" "$kproxy" --manifests "$work/m" --hostname-override bench-node --cluster-cidr 10.128.0.0/9 \
  --min-sync-period 0s --sync-period 1h --healthz-bind-address 127.0.0.1:10256 > "$work/kproxy.log" 2>&1 &
pid=$!
metric() { ip netns exec "$ns" curl -s http://127.0.0.1:10249/metrics | awk -v n="$1" '$1 == n {print $2}'; }
echo "==> waiting for the first full sync"
for _ in $(seq 1 6000); do
  c=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_count 2>/dev/null || true)
  [ -n "$c" ] && [ "${c%.*}" -ge 1 ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/kproxy.log"; exit 1; }
  sleep 0.1
done
full_s=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
rss_full=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")

echo "==> one EndpointSlice change"
python3 - "$work/m" "$services" "$endpoints" <<'PY'
import sys, datetime, os
out, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
i = n - 1
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
eps = ", ".join(f"{{addresses: [10.255.{j}.{1 + j}], nodeName: n0, conditions: {{ready: true}}}}" for j in range(m))
doc = (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
       f"labels: {{kubernetes.io/service-name: svc-{i}}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{now}'}}}}\n"
       f"addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")
tmp = f"{out}/.last.tmp"
open(tmp, "w").write(doc)
os.rename(tmp, f"{out}/last-slice.yaml")
PY
for _ in $(seq 1 600); do
  c=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_count)
  [ -n "$c" ] && [ "${c%.*}" -ge 1 ] && break
  sleep 0.1
done
partial_s=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)
programming_s=$(metric kubeproxy_network_programming_duration_seconds_sum)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
ip netns exec "$ns" iptables-save -t nat > "$work/nat.txt"
grep -q '10.255.0.1:8080' "$work/nat.txt" || { echo "change not in the kernel" >&2; exit 1; }

cpu=$(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')
backend=$(iptables --version)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`scripts/bench.sh $services $endpoints\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $cpu; $backend)."
  echo "Figures are single runs on a shared machine; rerun the script to compare."
  echo
  echo "| iptables mode, $services Services x $endpoints endpoints | kproxy | kube-proxy v1.33 (brief) |"
  echo "| --- | --- | --- |"
  printf "| first full sync | %.2f s | 447 s (nft backend) |\n" "$full_s"
  printf "| one EndpointSlice change: partial sync | %.3f s | 0.5 s |\n" "$partial_s"
  printf "| one EndpointSlice change: trigger time to kernel (network programming) | %.3f s | |\n" "$programming_s"
  printf "| resident memory after first sync / after change / peak | %d / %d / %d MiB | 211-295 MiB |\n" $((rss_full / 1024)) $((rss / 1024)) $((hwm / 1024))
  printf "| render only (parse, convert, render %d rules; no kernel) | %.2f s | |\n" "$rules" "$render_s"
  echo
  echo "The change latency includes re-reading all $services Services from the manifest files (the"
  echo "file source re-reads everything when a file changes); with the API source only the changed"
  echo "EndpointSlice is decoded. Partial syncs rewrite only the changed Service's chains plus the"
  echo "dispatch chains; the rest of the time is iptables-restore itself."
} > "$here/BENCHMARKS.md"
cat "$here/BENCHMARKS.md"
