# Sourced by benches/ingress.sh, benches/ingress-idle.sh and benches/gateway.sh (not run on its
# own): what they set up the same way. Expects `here` (the repository) and `ns_prefix`;
# defines `kproxy` (the binary, or KPROXY_BIN), `ns`, `work`, `pids`, `in_ns`,
# `write_manifests`, `start_kproxy` and `wait_for`, creates the network namespace (its
# /etc/hosts resolves myapp.example.com to loopback, so TLS clients send it as SNI) and removes
# it, and everything started in it, on exit.

if [ -n "${KPROXY_BIN:-}" ]; then
  kproxy=$KPROXY_BIN
else
  cargo build --quiet --release --bin kproxy --manifest-path "$here/Cargo.toml"
  kproxy=$here/target/release/kproxy
fi

ns=$ns_prefix-$$
work=$(mktemp -d "/tmp/$ns_prefix.XXXXXX")
chmod 755 "$work"
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
  sleep 0.5
  ip netns del "$ns" 2>/dev/null
  rm -rf "/etc/netns/$ns" "$work"
}
trap cleanup EXIT
ip netns add "$ns"
# `ip netns exec` reads /etc/netns/NAME/hosts as /etc/hosts.
mkdir -p "/etc/netns/$ns"
echo "127.0.0.1 localhost myapp.example.com" >"/etc/netns/$ns/hosts"
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up

# The walkthrough's objects for kproxy --manifests: a Service and its EndpointSlice (the
# backend on 127.0.0.1:8081), the TLS Secret from $work/tls.crt and $work/tls.key, and the
# Ingress for myapp.example.com/ with TLS (no redirect to HTTPS).
write_manifests() {
  mkdir -p "$work/manifests"
  cat >"$work/manifests/all.yaml" <<YAML
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
apiVersion: v1
kind: Secret
metadata: {name: myapp-tls, namespace: default}
type: kubernetes.io/tls
data: {tls.crt: $(base64 -w0 "$work/tls.crt"), tls.key: $(base64 -w0 "$work/tls.key")}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: myapp-ingress, namespace: default, annotations: {nginx.ingress.kubernetes.io/ssl-redirect: "false"}}
spec:
  ingressClassName: kproxy
  tls: [{hosts: [myapp.example.com], secretName: myapp-tls}]
  rules:
    - host: myapp.example.com
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: myapp-svc, port: {number: 80}}}}
YAML
}

# Starts kproxy in the namespace (HTTP on 8083, HTTPS on 8443), the given command prefix
# (taskset ...) before it; sets kproxy_pid once it answers.
start_kproxy() {
  in_ns "$@" "$kproxy" --manifests "$work/manifests" --hostname-override bench-node \
    --healthz-bind-address "" --metrics-bind-address "" \
    --ingress-http-bind-address 127.0.0.1:8083 --ingress-https-bind-address 127.0.0.1:8443 \
    2>"$work/kproxy.log" &
  pids+=($!)
}

# Waits until every URL answers 2xx (Host myapp.example.com); fails naming the first that does not.
wait_for() {
  local url
  for url in "$@"; do
    for _ in $(seq 1 100); do
      in_ns curl -skf -H "Host: myapp.example.com" "$url" >/dev/null && break
      sleep 0.1
    done
    in_ns curl -skf -H "Host: myapp.example.com" "$url" >/dev/null \
      || { echo "$url does not answer" >&2; cat "$work/kproxy.log" >&2; return 1; }
  done
  kproxy_pid=$(pgrep -f -- "--manifests $work/manifests" | head -1)
}
