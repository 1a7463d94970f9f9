#!/usr/bin/env bash
# Benchmark: kproxy in a network namespace with N Services x M endpoints (default 10000 x 10),
# from manifest files, in nftables mode and in iptables mode with each iptables backend (nft and
# legacy). Measures the first full sync (and how much of its CPU was kproxy's and how much the
# iptables tools'), CHANGES successive EndpointSlice changes (default 20: each one's partial
# sync, and the time from the slice's last-change-trigger-time to rules in the kernel, via
# kproxy's own kubeproxy_network_programming_duration_seconds; median and worst), the render
# cost alone (no kernel), and resident memory. Writes the figures to BENCHMARKS.md. Never run by
# the tests.
#
# usage: sudo [CHANGES=20] scripts/bench.sh [SERVICES] [ENDPOINTS] [VARIANTS]
#        (VARIANTS: "nftables nft legacy"; nft and legacy are iptables mode through that backend)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
services=${1:-10000}
endpoints=${2:-10}
backends=${3:-nftables nft legacy}
changes=${CHANGES:-20}
[ "$(id -u)" = 0 ] || { echo "bench.sh: needs root" >&2; exit 1; }

cargo build --quiet --release --manifest-path "$here/Cargo.toml"
kproxy=$here/target/release/kproxy
work=$(mktemp -d /tmp/kproxy-bench.XXXXXX)
ns=kpbench$$
pid=
cleanup() {
  set +e
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
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
def slice_doc(i):
    eps = ", ".join(f"{{addresses: [10.{128 + (i * m + j) // 65536}.{((i * m + j) // 256) % 256}.{(i * m + j) % 256}], "
                    f"nodeName: n{j % 3}, conditions: {{ready: true}}}}" for j in range(m))
    return (f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
            f"labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\n"
            f"ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")
with open(f"{out}/slices.yaml", "w") as f:
    for i in range(n - 1):
        f.write(slice_doc(i))
with open(f"{out}/last-slice.yaml", "w") as f:
    f.write(slice_doc(n - 1))
PY
cp "$work/m/last-slice.yaml" "$work/last-slice.orig"

echo "==> render only (parse, convert, render; no kernel)"
start=$(date +%s.%N)
"$kproxy" render --manifests "$work/m" --hostname-override bench-node > "$work/render.txt" 2>/dev/null
render_s=$(echo "$(date +%s.%N) - $start" | bc)
rules=$(grep -c '^-A' "$work/render.txt")

# Rewrites the last EndpointSlice with new endpoints (a different set for each K) and a trigger
# time of now.
change_slice() { # K
  python3 - "$work/m" "$services" "$endpoints" "$1" <<'PY'
import sys, datetime, os
out, n, m, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
i = n - 1
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
eps = ", ".join(f"{{addresses: [10.255.{j}.{1 + (j + k) % 250}], nodeName: n0, conditions: {{ready: true}}}}" for j in range(m))
doc = (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, "
       f"labels: {{kubernetes.io/service-name: svc-{i}}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{now}'}}}}\n"
       f"addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]\n")
tmp = f"{out}/.last.tmp"
open(tmp, "w").write(doc)
os.rename(tmp, f"{out}/last-slice.yaml")
PY
}

metric() { ip netns exec "$ns" curl -s http://127.0.0.1:10249/metrics | awk -v n="$1" '$1 == n {print $2}'; }
wait_metric() { # NAME MIN SECONDS
  local deadline=$((SECONDS + $3)) c
  while [ $SECONDS -lt $deadline ]; do
    c=$(metric "$1" 2>/dev/null || true)
    [ -n "$c" ] && [ "${c%.*}" -ge "$2" ] && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$work/kproxy.log" >&2; return 1; }
    sleep 0.2
  done
  echo "timed out waiting for $1" >&2
  return 1
}

rows=""
for backend in $backends; do
  case $backend in
    nftables) mode=nftables label="nftables" ;;
    *) mode=iptables label="iptables ($backend)" ;;
  esac
  echo "==> $label"
  tools=$work/tools-$backend
  mkdir -p "$tools"
  # Each tool through a wrapper that adds its CPU time (bash's `times`: user and system of
  # the children, every second line) to tools.cpu, for kproxy's and the tools' shares of the first full sync.
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    real=$(command -v "${t/iptables/iptables-$backend}" || command -v "$t")
    # shellcheck disable=SC2016 # $@ and $? belong to the wrapper being written
    printf '#!/bin/bash\n"%s" "$@"\nrc=$?\ntimes >> "%s"\nexit $rc\n' "$real" "$tools/tools.cpu" > "$tools/$t"
    chmod +x "$tools/$t"
  done
  : > "$tools/tools.cpu"
  cp "$work/last-slice.orig" "$work/m/last-slice.yaml"
  ip netns add "$ns"
  ip netns exec "$ns" ip link set lo up
  PATH="$tools:$PATH" ip netns exec "$ns" "$kproxy" --manifests "$work/m" --hostname-override bench-node \
    --proxy-mode "$mode" --cluster-cidr 10.128.0.0/9 --min-sync-period 0s --sync-period 1h \
    --ingress-http-bind-address "" --ingress-https-bind-address "" \
    --healthz-bind-address 127.0.0.1:10256 > "$work/kproxy.log" 2>&1 &
  pid=$!
  wait_metric kubeproxy_sync_full_proxy_rules_duration_seconds_count 1 3600
  full_s=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
  rss_full=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  # CPU seconds so far: kproxy's own (parsing the manifests included) and the tools'.
  kproxy_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat")
  tools_cpu_now() {
    awk 'NR % 2 == 0 {for (i = 1; i <= 2; i++) {v = $i; m = v; sub(/m.*/, "", m); s = v; sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); t += m * 60 + s}} END {printf "%.2f", t}' "$tools/tools.cpu"
  }
  tools_cpu=$(tools_cpu_now)
  : > "$work/partial" ; : > "$work/programming"
  for k in $(seq 1 "$changes"); do
    before_p=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)
    before_n=$(metric kubeproxy_network_programming_duration_seconds_sum)
    count=$(metric kubeproxy_network_programming_duration_seconds_count)
    change_slice "$k"
    wait_metric kubeproxy_network_programming_duration_seconds_count $((${count%.*} + 1)) 600
    echo "$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum) - ${before_p:-0}" | bc >> "$work/partial"
    echo "$(metric kubeproxy_network_programming_duration_seconds_sum) - ${before_n:-0}" | bc >> "$work/programming"
    sleep 0.5
  done
  stat_of() { sort -n "$1" | awk '{a[NR] = $1} END {printf "%.3f / %.3f s", a[int((NR + 1) / 2)], a[NR]}'; }
  per_change_cpu=$(echo "scale=3; ($(tools_cpu_now) - $tools_cpu) / $changes" | bc)
  partial_s="$(stat_of "$work/partial") (tools $per_change_cpu s CPU each)"
  programming_s=$(stat_of "$work/programming")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  if [ "$mode" = nftables ]; then
    ip netns exec "$ns" nft list table ip kproxy > "$work/nat.txt"
  else
    PATH="$tools:$PATH" ip netns exec "$ns" iptables-save -t nat > "$work/nat.txt"
  fi
  grep -qE "10\\.255\\.0\\.$((1 + changes % 250))(:| \\. )8080" "$work/nat.txt" || { echo "the last change is not in the kernel" >&2; exit 1; }
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  ip netns del "$ns"
  rows="$rows$(printf '| %s | %.2f s | %s / %s | %s | %s | %d / %d / %d MiB |' "$label" "$full_s" "$kproxy_cpu" \
    "$tools_cpu" "$partial_s" "$programming_s" $((rss_full / 1024)) $((rss / 1024)) $((hwm / 1024)))
"
done

cpu=$(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')
{
  echo "Written by \`scripts/bench.sh $services $endpoints\` (CHANGES=$changes) on $(date -u +%Y-%m-%d) ($(nproc) cores, $cpu;"
  echo "$(iptables --version | sed 's/ (.*//'))). Single runs on a shared machine: rerun the script to compare."
  echo
  echo "$services Services x $endpoints endpoints ($rules rules in iptables mode), from manifest files:"
  echo
  echo "| mode (iptables backend) | first full sync | CPU until then: kproxy / iptables tools | $changes EndpointSlice changes: partial sync, median / worst | change: trigger time to kernel, median / worst | memory after first sync / after changes / peak |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf "%s" "$rows"
  echo
  printf "Render alone (parse the files, convert, render every rule, no kernel): %.2f s.\n" "$render_s"
  echo
  echo "kube-proxy v1.33 on a machine like this one (the brief's figures): first full sync 447 s"
  echo "(iptables, nft backend) and 29.5 s (nftables mode); one change 0.5 s (iptables) to 1.8 s"
  echo "(nftables); 211-295 MiB resident. Through iptables-legacy it syncs 10,000 Services in 7.9 s."
  echo
  echo "kproxy's CPU includes parsing the manifest files at start; the tools' CPU is every iptables,"
  echo "iptables-save and iptables-restore kproxy ran (the first full sync: one iptables-save per"
  echo "table and one iptables-restore per family). The change latency includes the"
  echo "manifest source noticing the file (it polls every 100 ms), parsing that one file again and"
  echo "replacing the store's objects with the full set, as a relist would; the partial sync writes"
  echo "only the changed Service's chains that differ, and the dispatch chains only if they changed."
} > "$work/section.md"
# Replace this script's section of BENCHMARKS.md, leaving the other benchmarks' sections alone.
python3 - "$here/BENCHMARKS.md" "$work/section.md" <<'PY'
import sys, os
path, section = sys.argv[1], open(sys.argv[2]).read().strip()
begin, end = "<!-- scripts/bench.sh: begin -->", "<!-- scripts/bench.sh: end -->"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n## Service proxy: iptables mode\n\n" + begin + "\n" + end + "\n"
head, _, tail = text.partition(begin)
_, _, tail = tail.partition(end)
open(path, "w").write(head + begin + "\n" + section + "\n" + end + tail)
PY
sed -n '/scripts\/bench.sh: begin/,/scripts\/bench.sh: end/p' "$here/BENCHMARKS.md"
