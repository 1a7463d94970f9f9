#!/usr/bin/env bash
# Benchmark (not a test) of the embedded Ingress proxy: requests per second and p50/p99 latency,
# measured with wrk on loopback for the same route to the same backend: the backend directly
# (the limit), through kproxy, and through nginx (Debian's package) configured for that route
# with as many worker processes as kproxy has worker threads (2). Everything runs in a
# throwaway network namespace; prints a Markdown table for BENCHMARKS.md.
#
# usage: sudo benches/ingress.sh [DURATION_SECONDS] [CONNECTIONS]   (needs wrk, nginx, curl)
#        BENCH_PERF=FILE sudo benches/ingress.sh ...   records a perf profile of kproxy under load instead
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
duration=${1:-10}
connections=${2:-64}
[ "$(id -u)" = 0 ] || { echo "ingress.sh: needs root (network namespace)" >&2; exit 1; }
for tool in wrk nginx curl ip; do
  command -v "$tool" >/dev/null || { echo "ingress.sh: missing $tool (apt-get install wrk nginx-light curl iproute2)" >&2; exit 1; }
done

cargo build --quiet --release --bin kproxy --manifest-path "$here/Cargo.toml"
kproxy=$here/target/release/kproxy

ns=kpbench-$$
work=$(mktemp -d /tmp/kproxy-bench.XXXXXX)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
  sleep 0.5
  ip netns del "$ns" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up

# The backend: nginx answering a fixed body, one worker.
cat > "$work/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:8081 backlog=4096;
    location / { return 200 "hello from the backend\n"; }
  }
}
CONF
# nginx as the proxy, with what ingress-nginx sets for such a route.
cat > "$work/proxy.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/proxy.pid;
error_log $work/proxy.err;
events { worker_connections 4096; }
http {
  access_log off;
  upstream myapp { server 127.0.0.1:8081; keepalive 64; }
  server {
    listen 127.0.0.1:8082 backlog=4096;
    location / {
      proxy_pass http://myapp;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
CONF
mkdir -p "$work/manifests"
cat > "$work/manifests/all.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: myapp-svc, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: myapp-svc-1, namespace: default, labels: {kubernetes.io/service-name: myapp-svc}}
addressType: IPv4
ports: [{name: http, port: 8081, protocol: TCP}]
endpoints: [{addresses: [127.0.0.1], conditions: {ready: true}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: myapp-ingress, namespace: default}
spec:
  ingressClassName: kproxy
  rules:
    - host: myapp.example.com
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: myapp-svc, port: {number: 80}}}}
YAML

in_ns nginx -c "$work/backend.conf" & pids+=($!)
in_ns nginx -c "$work/proxy.conf" & pids+=($!)
in_ns "$kproxy" --manifests "$work/manifests" --hostname-override bench-node \
  --healthz-bind-address "" --metrics-bind-address "" \
  --ingress-http-bind-address 127.0.0.1:8083 --ingress-https-bind-address "" \
  2>"$work/kproxy.log" & pids+=($!)

for port in 8081 8082 8083; do
  for _ in $(seq 1 100); do
    in_ns curl -sf -H "Host: myapp.example.com" "http://127.0.0.1:$port/" >/dev/null && break
    sleep 0.1
  done
  in_ns curl -sf -H "Host: myapp.example.com" "http://127.0.0.1:$port/" >/dev/null \
    || { echo "port $port does not answer" >&2; cat "$work/kproxy.log" >&2; exit 1; }
done

# "Requests/sec: N" and the 50%/99% lines of wrk --latency, as "rps p50 p99".
measure() {
  local out
  out=$(in_ns wrk -t2 -c"$connections" -d"${duration}s" --latency -H "Host: myapp.example.com" "$1")
  echo "$out" >>"$work/wrk.txt"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {printf "%d", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$rps $p50 $p99"
}

echo "| Path | Requests/s | p50 | p99 |"
echo "| --- | ---: | ---: | ---: |"
if [ -n "${BENCH_PERF:-}" ]; then
  kpid=$(pgrep -f "target/release/kproxy --manifests $work/manifests" | head -1)
  perf record -F 499 -g -p "$kpid" -o "$BENCH_PERF" -- sleep "$duration" >/dev/null 2>&1 &
  perf_pid=$!
  in_ns wrk -t2 -c"$connections" -d"${duration}s" -H "Host: myapp.example.com" http://127.0.0.1:8083/ >/dev/null
  # Only perf: a bare `wait` would also wait for the servers started above.
  wait "$perf_pid"
  exit 0
fi
for target in "backend directly|http://127.0.0.1:8081/" "kproxy|http://127.0.0.1:8083/" "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')|http://127.0.0.1:8082/"; do
  name=${target%%|*}
  url=${target#*|}
  read -r rps p50 p99 < <(measure "$url")
  echo "| $name | $rps | $p50 | $p99 |"
done
echo
echo "wrk -t2 -c$connections -d${duration}s, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')), wrk, backend and proxy sharing them."
