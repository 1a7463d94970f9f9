#!/usr/bin/env bash
# kproxy's main job on this machine, with no cluster: a node in a network namespace, the
# walkthrough's 2 replicas as pods in their own namespaces, an outside client, and kproxy
# programming the node from the walkthrough's manifests (examples/walkthrough, unchanged).
#
# The script plays the control plane's part: it starts one pod per replica and writes the
# EndpointSlice the EndpointSlice controller would write. kproxy allocates the Service's
# cluster IP as the API server would.
#
# usage: sudo scripts/demo.sh [--keep]     (--keep leaves everything running; Ctrl-C cleans up)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[ "${1:-}" = "--keep" ] && keep=1
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, iptables)" >&2; exit 1; }
# shellcheck source=scripts/lib-setup.sh
. "$here/scripts/lib-setup.sh"
ensure_cargo demo.sh
ensure_commands demo.sh ip:iproute2 iptables-restore:iptables curl:curl python3:python3

echo "==> building kproxy"
cargo build --quiet --release --manifest-path "$here/Cargo.toml"
kproxy=$here/target/release/kproxy

id=kpdemo
node=${id}-node
client=${id}-client
work=$(mktemp -d /tmp/kproxy-demo.XXXXXX)
pids=()
fails=0

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  ip netns exec "$node" "$kproxy" --cleanup >/dev/null 2>&1
  for ns in $(ip netns list | awk '{print $1}' | grep "^${id}-"); do
    for p in $(ip netns pids "$ns"); do kill "$p" 2>/dev/null; done
    ip netns del "$ns"
  done
  rm -rf "$work"
}
trap cleanup EXIT
cleanup 2>/dev/null || true
work=$(mktemp -d /tmp/kproxy-demo.XXXXXX)

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

echo "==> node namespace $node (node IP 192.0.2.1) and outside client $client (192.0.2.100)"
ip netns add "$node"; ip netns add "$client"
in_ns "$node" ip link set lo up; in_ns "$client" ip link set lo up
in_ns "$node" sysctl -qw net.ipv4.ip_forward=1
ip link add eth0 netns "$node" type veth peer name eth0 netns "$client"
in_ns "$node" ip addr add 192.0.2.1/24 dev eth0; in_ns "$node" ip link set eth0 up
in_ns "$client" ip addr add 192.0.2.100/24 dev eth0; in_ns "$client" ip link set eth0 up
in_ns "$node" ip route add default via 192.0.2.100

replicas=$(awk '/replicas:/ {print $2; exit}' "$here/examples/walkthrough/deployment.yaml")
echo "==> deployment myapp: $replicas replicas as pods"
endpoints=""
for i in $(seq 1 "$replicas"); do
  pod=myapp-$i
  ns=${id}-$pod
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
  ip link add "veth$i" netns "$node" type veth peer name eth0 netns "$ns"
  in_ns "$node" ip addr add "10.244.$i.1/24" dev "veth$i"; in_ns "$node" ip link set "veth$i" up
  in_ns "$ns" ip addr add "10.244.$i.2/24" dev eth0; in_ns "$ns" ip link set eth0 up
  in_ns "$ns" ip route add default via "10.244.$i.1"
  mkdir -p "$work/$pod"
  echo "Hello from $pod (10.244.$i.2)" > "$work/$pod/index.html"
  in_ns "$ns" python3 -m http.server 80 --bind 0.0.0.0 --directory "$work/$pod" >/dev/null 2>&1 &
  pids+=($!)
  endpoints="$endpoints
  - addresses: [10.244.$i.2]
    nodeName: demo-node
    conditions: {ready: true}
    targetRef: {kind: Pod, name: $pod}"
  echo "    pod $pod: 10.244.$i.2 in namespace $ns"
done

mkdir -p "$work/manifests"
cp "$here"/examples/walkthrough/*.yaml "$work/manifests/"
cat > "$work/manifests/cluster.yaml" <<EOF
# What the control plane would add: the node, the EndpointSlice of myapp-svc, and a NodePort
# Service for the same pods so the outside client has something to reach.
apiVersion: v1
kind: Node
metadata: {name: demo-node}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: myapp-svc-demo1
  namespace: default
  labels: {kubernetes.io/service-name: myapp-svc}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints:$endpoints
---
apiVersion: v1
kind: Service
metadata: {name: myapp-nodeport, namespace: default}
spec:
  type: NodePort
  selector: {app: myapp}
  ports: [{protocol: TCP, port: 80, targetPort: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: myapp-nodeport-demo1
  namespace: default
  labels: {kubernetes.io/service-name: myapp-nodeport}
addressType: IPv4
ports: [{port: 80, protocol: TCP}]
endpoints:$endpoints
EOF

# The pods' readiness, as the kubelet's probe would see it: each server answers.
for i in $(seq 1 "$replicas"); do
  for _ in $(seq 1 100); do
    in_ns "${id}-myapp-$i" curl -s -o /dev/null --max-time 1 http://127.0.0.1/ && break
    sleep 0.1
  done
done

echo "==> starting kproxy in $node"
in_ns "$node" "$kproxy" --manifests "$work/manifests" --hostname-override demo-node \
  --cluster-cidr 10.244.0.0/16 --healthz-bind-address 127.0.0.1:10256 \
  --ingress-class nginx >"$work/kproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  if in_ns "$node" curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:10249/metrics 2>/dev/null | grep -q 200 &&
     in_ns "$node" curl -s http://127.0.0.1:10249/metrics | grep -q '^kubeproxy_sync_proxy_rules_duration_seconds_count [1-9]'; then
    break
  fi
  sleep 0.1
done

echo "==> kproxy render --output services   (like kubectl get svc)"
"$kproxy" render --manifests "$work/manifests" --hostname-override demo-node --output services 2>/dev/null
cluster_ip=$("$kproxy" render --manifests "$work/manifests" --hostname-override demo-node --output services 2>/dev/null |
  awk '$2 == "myapp-svc" {print $3}')

echo "==> curl http://$cluster_ip/ from the node, 6 times"
for _ in 1 2 3 4 5 6; do in_ns "$node" curl -s --max-time 3 "http://$cluster_ip/" || { echo "    no answer"; fails=$((fails + 1)); }; done
echo "==> curl http://$cluster_ip/ from pod myapp-1"
in_ns "${id}-myapp-1" curl -s --max-time 3 "http://$cluster_ip/" || { echo "    no answer"; fails=$((fails + 1)); }
echo "==> curl http://192.0.2.1:30080/ from the outside client, 4 times"
for _ in 1 2 3 4; do in_ns "$client" curl -s --max-time 3 http://192.0.2.1:30080/ || { echo "    no answer"; fails=$((fails + 1)); }; done
echo "==> the walkthrough's Ingresses (class nginx) from the outside client: http://myapp.example.com/"
echo "    (the host has TLS, so plain HTTP is redirected with 308, as ingress-nginx does)"
in_ns "$client" curl -s -o /dev/null -w '    %{http_code} -> %{redirect_url}\n' --max-time 3 \
  --resolve myapp.example.com:80:192.0.2.1 http://myapp.example.com/
echo "==> https://myapp.example.com/ (the demo has no Secret myapp-tls-secret, so kproxy answers with"
echo "    its self-signed default certificate: curl -k)"
for _ in 1 2 3 4; do
  in_ns "$client" curl -sk --max-time 3 --resolve myapp.example.com:443:192.0.2.1 https://myapp.example.com/ || { echo "    no answer"; fails=$((fails + 1)); }
done

echo "==> kproxy's log"
grep -E "synced|loaded|allocated" "$work/kproxy.log" | sed 's/^/    /' | head -8

if [ "$keep" = 1 ]; then
  echo "==> running; try: ip netns exec $client curl http://192.0.2.1:30080/   (Ctrl-C to clean up)"
  wait
fi
echo "==> cleaning up (kproxy --cleanup, namespaces)"
if [ "$fails" -gt 0 ]; then
  echo "demo.sh: $fails request(s) got no answer; kproxy's log: see above" >&2
  exit 1
fi
