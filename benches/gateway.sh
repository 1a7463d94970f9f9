#!/usr/bin/env bash
# Benchmark (not a test) of the Gateway API side of the embedded proxy, from manifest files:
#  1. N HTTPRoutes (one hostname each) on one Gateway listener: the time from kproxy's start
#     until the last route serves, and kproxy's resident memory then (and its peak);
#  2. route propagation at that size: a route added (or removed) in a new file, and the time
#     until it serves (or answers 404), over several rounds.
# Everything runs in a throwaway network namespace on loopback; prints Markdown for
# BENCHMARKS.md. The manifest source polls its files every 100 ms, and the route table is
# rebuilt at most every 100 ms, so both are part of every propagation time.
#
# usage: sudo benches/gateway.sh [ROUTES] [ROUNDS]   (needs nginx, curl)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
routes=${1:-5000}
rounds=${2:-20}
[ "$(id -u)" = 0 ] || { echo "gateway.sh: needs root (network namespace)" >&2; exit 1; }
for tool in nginx curl ip; do
  command -v "$tool" >/dev/null || { echo "gateway.sh: missing $tool (apt-get install nginx-light curl iproute2)" >&2; exit 1; }
done

ns_prefix=kpgwbench
# The binary, the namespace with its cleanup, `work`, `pids` and `in_ns`.
. "$here/benches/ingress-common.sh"

cat > "$work/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:8081;
    location / { return 200 "hello from the backend\n"; }
  }
}
CONF

mkdir -p "$work/manifests"
cat > "$work/manifests/00-base.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 8080, targetPort: 8081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-1, namespace: default, labels: {kubernetes.io/service-name: backend}}
addressType: IPv4
ports: [{name: '', port: 8081, protocol: TCP}]
endpoints: [{addresses: [127.0.0.1], conditions: {ready: true}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: kproxy}
spec: {controllerName: kproxy.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bench, namespace: default}
spec:
  gatewayClassName: kproxy
  listeners: [{name: http, port: 8083, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
YAML
# The routes, 500 to a file (as a GitOps tree would split them).
for ((i = 0; i < routes; i++)); do
  printf 'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r%d, namespace: default}\nspec:\n  parentRefs: [{name: bench}]\n  hostnames: [r%d.bench.test]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: x-route, value: r%d}]}]\n    backendRefs: [{name: backend, port: 8080}]\n---\n' "$i" "$i" "$i" \
    >>"$work/manifests/routes-$((i / 500)).yaml"
done

in_ns nginx -c "$work/backend.conf" & pids+=($!)
now_ms() { date +%s%3N; }
served() { # HOST: the HTTP code kproxy answers for it
  in_ns curl -s -o /dev/null -w '%{http_code}' -H "Host: $1" http://127.0.0.1:8083/ 2>/dev/null || true
}
start=$(now_ms)
in_ns "$kproxy" --manifests "$work/manifests" --hostname-override bench-node \
  --healthz-bind-address "" --metrics-bind-address "" \
  --ingress-http-bind-address 127.0.0.1:8090 --ingress-https-bind-address "" \
  2>"$work/kproxy.log" & pids+=($!)
kpid=""
for _ in $(seq 1 50); do
  kpid=$(pgrep -f "target/release/kproxy --manifests $work/manifests" | head -1 || true)
  [ -n "$kpid" ] && break
  sleep 0.1
done
last="r$((routes - 1)).bench.test"
until [ "$(served "$last")" = 200 ]; do
  (( $(now_ms) - start < 300000 )) || { echo "the last route never served" >&2; tail -20 "$work/kproxy.log" >&2; exit 1; }
  sleep 0.02
done
first_full=$(( $(now_ms) - start ))
for i in 0 1 $((routes / 2)) $((routes - 2)); do
  [ "$(served "r$i.bench.test")" = 200 ] || { echo "route r$i does not serve" >&2; exit 1; }
done
rss() { awk -v k="$1" '$1 == k":" {printf "%.0f", $2 / 1024}' "/proc/$kpid/status"; }
rss_after=$(rss VmRSS)

adds=()
removes=()
for ((r = 0; r < rounds; r++)); do
  file="$work/manifests/zz-probe.yaml"
  printf 'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: probe%d, namespace: default}\nspec:\n  parentRefs: [{name: bench}]\n  hostnames: [probe%d.bench.test]\n  rules: [{backendRefs: [{name: backend, port: 8080}]}]\n' "$r" "$r" >"$work/probe.tmp"
  t0=$(now_ms)
  mv "$work/probe.tmp" "$file"
  until [ "$(served "probe$r.bench.test")" = 200 ]; do sleep 0.005; done
  adds+=($(( $(now_ms) - t0 )))
  t0=$(now_ms)
  rm -f "$file"
  until [ "$(served "probe$r.bench.test")" = 404 ]; do sleep 0.005; done
  removes+=($(( $(now_ms) - t0 )))
  sleep 0.3
done
rss_end=$(rss VmRSS)
rss_peak=$(rss VmHWM)
stats() { # "median p90 max" of the arguments (milliseconds)
  printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {m = a[int((NR + 1) / 2)]; p = a[int(NR * 0.9 + 0.999)]; printf "%d %d %d\n", m, p, a[NR]}'
}
read -r add_med add_p90 add_max < <(stats "${adds[@]}")
read -r rm_med rm_p90 rm_max < <(stats "${removes[@]}")

echo "$routes HTTPRoutes (one hostname, two matches each) on one Gateway listener, from $(find "$work/manifests" -name "*.yaml" | wc -l) manifest files:"
echo
echo "| | value |"
echo "| --- | ---: |"
echo "| kproxy start until the last route serves | $(awk -v m="$first_full" 'BEGIN {printf "%.2f s", m / 1000}') |"
echo "| resident memory then / after $rounds more changes / peak | $rss_after / $rss_end / $rss_peak MiB |"
echo "| a route added: until it serves (median / p90 / max of $rounds) | $add_med / $add_p90 / $add_max ms |"
echo "| a route removed: until it answers 404 (median / p90 / max) | $rm_med / $rm_p90 / $rm_max ms |"
echo
echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')); release build; times include the manifest source's 100 ms poll and the 100 ms rebuild batching."
