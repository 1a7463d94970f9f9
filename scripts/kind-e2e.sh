#!/usr/bin/env bash
# The Ingress walkthrough (shared/seeds/ingress-walkthrough.md) end to end on
# the kind cluster of scripts/kind-up.sh, with kproxy as the only proxy. Stops
# loudly at the first step that does not work, with diagnostics.
#
#   scripts/kind-e2e.sh [--name kproxy] [--proxy-mode iptables|ipvs|nftables] [--redeploy] [--keep]
#
# If the cluster does not exist, or kproxy runs in another mode, kind-up.sh is
# run first. Needs docker, kind, kubectl, curl and openssl on the host, and
# Docker Hub access from the cluster (nginx and curl images).
set -Eeuo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-kind.sh
source "${script_dir}/lib-kind.sh"

usage() {
    cat <<EOF
Usage: $0 [options]

  --name NAME          kind cluster name (default: kproxy)
  --proxy-mode MODE    iptables (default), ipvs or nftables
  --redeploy           run kind-up.sh first even if the cluster already runs
                       kproxy in MODE (rebuilds the image from this checkout)
  --keep               keep the test namespace afterwards (it is always kept
                       after a failure, for inspection)
  -h, --help           this help

Environment: E2E_CLIENT_IMAGE (default ${client_image_default}), an image with
curl, sh and nslookup, used for the in-cluster client pod.
EOF
}

client_image_default=curlimages/curl:8.11.1
client_image=${E2E_CLIENT_IMAGE:-${client_image_default}}
cluster_name=kproxy
proxy_mode=iptables
keep=false
redeploy=false
while (($# > 0)); do
    case "$1" in
        --name) cluster_name=${2:?--name needs a value}; shift 2 ;;
        --proxy-mode) proxy_mode=${2:?--proxy-mode needs a value}; shift 2 ;;
        --keep) keep=true; shift ;;
        --redeploy) redeploy=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

ns=kproxy-e2e
diag_namespace=${ns}
host=myapp.example.com
node_port=30080
# Every request carries a tag in its query string, so each pod's nginx access
# log tells exactly which of this run's requests it served.
run_id="e2e$(date +%s)$$"
work_dir=$(mktemp -d)
trap 'rm -rf "${work_dir}"' EXIT

# --- helpers -----------------------------------------------------------------

myapp_pods() {
    kc -n "${ns}" get pods -l app=myapp --field-selector=status.phase=Running \
        -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}'
}

# served TAG: "POD COUNT" for each myapp pod, counting requests tagged TAG.
served() {
    local pod count
    for pod in $(myapp_pods); do
        count=$(kc -n "${ns}" logs "${pod}" 2>/dev/null | grep -c -- "probe=$1-") || true
        echo "${pod} ${count:-0}"
    done
}

# expect_served TAG N [MIN_PODS]: the access logs show exactly N requests
# tagged TAG, spread over at least MIN_PODS pods (logs can lag: retried).
expect_served() {
    local tag=$1 want=$2 min_pods=${3:-1} deadline=$((SECONDS + 20)) report total pods
    while true; do
        report=$(served "${tag}")
        total=$(awk '{ s += $2 } END { print s + 0 }' <<<"${report}")
        pods=$(awk '$2 > 0 { n++ } END { print n + 0 }' <<<"${report}")
        if ((total == want && pods >= min_pods)); then
            while read -r pod count; do info "${pod} answered ${count}"; done <<<"${report}"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            while read -r pod count; do info "${pod} answered ${count}"; done <<<"${report}"
            die "expected ${want} requests tagged ${tag} over at least ${min_pods} pod(s); logs show ${total} over ${pods}"
        fi
        sleep 2
    done
}

# codes_from_pod URL N: N requests from the client pod, one HTTP code per line
# (000 when no answer came). The request number is appended to URL.
codes_from_pod() {
    # shellcheck disable=SC2016 # expanded by the pod's shell, from its arguments
    kc -n "${ns}" exec e2e-client -- sh -c '
        i=1
        while [ "$i" -le "$2" ]; do
            curl -s -o /dev/null --max-time 5 -w "%{http_code}\n" "$1$i"
            i=$((i + 1))
        done' sh "$1" "$2"
}

# codes_from_host N CURL_ARGS... URL: N requests from the host (URL last,
# the request number is appended to it).
codes_from_host() {
    local n=$1 i
    shift
    local args=("${@:1:$#-1}") url=${!#}
    for ((i = 1; i <= n; i++)); do
        # ${args[@]+...}: an empty array under set -u, also in bash 3.2 (macOS).
        curl -s -o /dev/null --max-time 5 -w '%{http_code}\n' ${args[@]+"${args[@]}"} "${url}${i}" || true
    done
}

# all_ok CODES: true if every line of CODES is 200.
all_ok() {
    [[ -n "$1" ]] && ! grep -qv '^200$' <<<"$1"
}

# expect_all_ok CODES WHAT: fail unless every code is 200, showing the tally.
expect_all_ok() {
    all_ok "$1" || die "$2: not every request answered 200 (count, code: $(sort <<<"$1" | uniq -c | tr -s ' \n' ' '))"
}

http_code() { # CURL_ARGS... : one request from the host, prints the code.
    curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$@" || true
}

expect_code() { # WANT CURL_ARGS...
    local want=$1 got
    shift
    got=$(http_code "$@")
    [[ "${got}" == "${want}" ]] || { echo "curl $* answered ${got:-nothing}, expected ${want}"; return 1; }
}

# pod_gets_200 URL: one request from the client pod answers 200.
pod_gets_200() {
    [[ $(kc -n "${ns}" exec e2e-client -- curl -s -o /dev/null --max-time 3 -w '%{http_code}' "$1") == 200 ]]
}

# Ready addresses in myapp-svc's EndpointSlices, sorted, on one line.
ready_endpoints() {
    kc -n "${ns}" get endpointslices -l kubernetes.io/service-name=myapp-svc \
        -o 'jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' \
        | sort | tr '\n' ' '
}

endpoints_are() { [[ "$(ready_endpoints)" == "$1" ]]; }

# The host port forwarded to a control-plane container port (kind-up.sh's
# extraPortMappings): 80 -> 80 unless --http-port changed it.
host_port_of() {
    local mapped
    mapped=$(docker port "${cluster_name}-control-plane" "$1/tcp" 2>/dev/null | head -n 1) || true
    [[ -n "${mapped}" ]] || return 1
    echo "${mapped##*:}"
}

# --- the walkthrough ---------------------------------------------------------

step "Preparing: cluster '${cluster_name}' with kproxy in ${proxy_mode} mode"
check_proxy_mode "${proxy_mode}"
require_tools docker kind kubectl curl openssl awk
if ! cluster_exists; then
    info "no cluster '${cluster_name}' yet: running kind-up.sh"
    "${script_dir}/kind-up.sh" --name "${cluster_name}" --proxy-mode "${proxy_mode}"
elif [[ "${redeploy}" == true ]]; then
    "${script_dir}/kind-up.sh" --name "${cluster_name}" --proxy-mode "${proxy_mode}"
elif [[ "$(deployed_proxy_mode)" != "${proxy_mode}" ]]; then
    info "kproxy runs in '$(deployed_proxy_mode)' mode: redeploying with kind-up.sh"
    "${script_dir}/kind-up.sh" --name "${cluster_name}" --proxy-mode "${proxy_mode}"
fi
[[ "$(deployed_proxy_mode)" == "${proxy_mode}" ]] || die "kproxy's ConfigMap does not say mode ${proxy_mode}"
if kc -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "kube-proxy runs in this cluster: the test would not be testing kproxy"
fi
kc -n kube-system rollout status daemonset/kproxy --timeout=120s || die "kproxy is not ready on every node"
forwarding_error="is not forwarded to the host: was the cluster made by scripts/kind-up.sh?"
http_port=$(host_port_of 80) || die "port 80 of ${cluster_name}-control-plane ${forwarding_error}"
https_port=$(host_port_of 443) || die "port 443 of ${cluster_name}-control-plane ${forwarding_error}"
mapped_node_port=$(host_port_of "${node_port}") || die "port ${node_port} of ${cluster_name}-control-plane ${forwarding_error}"
if [[ "$(uname -s)" == Linux ]]; then
    reach_node_ips=true
else
    reach_node_ips=false
    info "not Linux: the host cannot reach node IPs, so NodePort and Ingress are checked through the control plane's forwarded ports only"
fi
if kc get namespace "${ns}" >/dev/null 2>&1; then
    info "deleting namespace ${ns} left from an earlier run"
    kc delete namespace "${ns}" --wait=true --timeout=120s
fi
kc create namespace "${ns}"
retry 30 kc -n "${ns}" get serviceaccount default >/dev/null || die "namespace ${ns} got no default ServiceAccount"
ok "kproxy ${proxy_mode} on every node, kube-proxy absent, namespace ${ns} ready"

step "Creating the walkthrough's 2-replica Deployment and ClusterIP Service"
kc -n "${ns}" apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
spec:
  replicas: 2  # 创建两个副本的 Pod
  selector:
    matchLabels:
      app: myapp
  template:
    metadata:
      labels:
        app: myapp  # 标签是 Service 匹配的关键
    spec:
      containers:
        - name: myapp
          image: nginx  # 示例应用：nginx
          ports:
            - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: myapp-svc
spec:
  selector:
    app: myapp  # 匹配 Deployment 中的 label
  ports:
    - protocol: TCP
      port: 80         # 对外暴露端口
      targetPort: 80   # 容器中的端口
  type: ClusterIP      # 内部访问，默认类型
EOF
kc -n "${ns}" run e2e-client --image="${client_image}" --restart=Never --command -- sleep 3600 >/dev/null
kc -n "${ns}" rollout status deployment/myapp --timeout=180s || die "myapp pods did not become ready (image pull?)"
kc -n "${ns}" wait --for=condition=Ready pod/e2e-client --timeout=180s || die "the client pod did not become ready (image ${client_image})"
kc -n "${ns}" get pods -o wide
[[ $(myapp_pods | wc -l) -eq 2 ]] || die "expected 2 running myapp pods"
ok "2 myapp replicas and the client pod are running"

step "kubectl get svc"
kc -n "${ns}" get svc myapp-svc -o wide
cluster_ip=$(kc -n "${ns}" get svc myapp-svc -o 'jsonpath={.spec.clusterIP}')
[[ "${cluster_ip}" =~ ^[0-9a-f.:]+$ ]] || die "myapp-svc has no ClusterIP (got '${cluster_ip}')"
ok "myapp-svc has ClusterIP ${cluster_ip}"

step "curl the ClusterIP from a pod: both replicas answer"
retry 60 pod_gets_200 "http://${cluster_ip}/" \
    || die "http://${cluster_ip}/ never answered 200 from the client pod"
tag="${run_id}-clusterip"
expect_all_ok "$(codes_from_pod "http://${cluster_ip}/?probe=${tag}-" 20)" "20 requests to http://${cluster_ip}/"
expect_served "${tag}" 20 2
ok "20 of 20 requests answered, by both replicas"

step "NodePort Service: curl nodeIP:${node_port} from the host, for every node"
kc -n "${ns}" apply -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: myapp-nodeport
spec:
  type: NodePort
  selector:
    app: myapp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 80
      nodePort: ${node_port}
EOF
kc get nodes -o wide
targets=()
if [[ "${reach_node_ips}" == true ]]; then
    while read -r node ip; do
        targets+=("${node}=${ip}:${node_port}")
    done < <(kc get nodes -o 'jsonpath={range .items[*]}{.metadata.name}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
    [[ ${#targets[@]} -eq 3 ]] || die "expected 3 nodes, found ${#targets[@]}"
fi
targets+=("forwarded-port=127.0.0.1:${mapped_node_port}")
for target in "${targets[@]}"; do
    name=${target%%=*} address=${target#*=}
    retry 60 expect_code 200 "http://${address}/" \
        || die "http://${address}/ (${name}) never answered 200 from the host"
    tag="${run_id}-nodeport-${name}"
    expect_all_ok "$(codes_from_host 6 "http://${address}/?probe=${tag}-")" "6 requests to http://${address}/ (${name})"
    expect_served "${tag}" 6
    ok "http://${address}/ (${name}): 6 of 6 answered by myapp pods"
done

step "HTTP Ingress (the walkthrough's, class nginx) with Host: ${host}"
# The walkthrough's Ingresses name ingressClassName nginx: the extra
# IngressClass hands that class to kproxy.
kc apply -f "${repo_root}/manifests/extras/ingressclass-nginx.yaml"
kc -n "${ns}" apply -f - <<'EOF'
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: myapp-ingress
  annotations:
    nginx.ingress.kubernetes.io/rewrite-target: /
spec:
  ingressClassName: nginx  # 指定使用 nginx ingress controller
  rules:
    - host: myapp.example.com  # 外部访问域名
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: myapp-svc
                port:
                  number: 80
EOF
kc -n "${ns}" get ingress myapp-ingress
http_targets=("forwarded-port=127.0.0.1:${http_port}")
if [[ "${reach_node_ips}" == true ]]; then
    while read -r node ip; do
        http_targets+=("${node}=${ip}:80")
    done < <(kc get nodes -o 'jsonpath={range .items[*]}{.metadata.name}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
fi
for target in "${http_targets[@]}"; do
    name=${target%%=*} address=${target#*=}
    retry 60 expect_code 200 -H "Host: ${host}" "http://${address}/" \
        || die "http://${address}/ with Host: ${host} (${name}) never answered 200"
    tag="${run_id}-ingress-http-${name}"
    expect_all_ok "$(codes_from_host 6 -H "Host: ${host}" "http://${address}/?probe=${tag}-")" \
        "6 Ingress requests to ${address} (${name})"
    expect_served "${tag}" 6
    ok "http://${host}/ via ${address} (${name}): 6 of 6 answered by myapp pods"
done
expect_code 404 -H "Host: unknown.example.com" "http://127.0.0.1:${http_port}/" \
    || die "a Host no Ingress names should get 404"
ok "a Host no Ingress names gets 404"

step "HTTPS Ingress: self-signed certificate, kubectl create secret tls, curl --resolve"
openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 2 \
    -subj "/CN=${host}" -addext "subjectAltName=DNS:${host}" \
    -keyout "${work_dir}/key.pem" -out "${work_dir}/cert.pem" 2>/dev/null
kc -n "${ns}" create secret tls myapp-tls-secret --cert="${work_dir}/cert.pem" --key="${work_dir}/key.pem"
kc -n "${ns}" apply -f - <<'EOF'
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: myapp-ingress-tls
  annotations:
    nginx.ingress.kubernetes.io/rewrite-target: /
spec:
  ingressClassName: nginx
  tls:
    - hosts:
        - myapp.example.com
      secretName: myapp-tls-secret
  rules:
    - host: myapp.example.com
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: myapp-svc
                port:
                  number: 80
EOF
kc -n "${ns}" get ingress
https_targets=("forwarded-port=127.0.0.1:${https_port}")
if [[ "${reach_node_ips}" == true ]]; then
    while read -r node ip; do
        https_targets+=("${node}=${ip}:443")
    done < <(kc get nodes -o 'jsonpath={range .items[*]}{.metadata.name}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
fi
for target in "${https_targets[@]}"; do
    name=${target%%=*} address=${target#*=}
    port=${address##*:} ip=${address%:*}
    # --cacert: only our certificate verifies, so kproxy's default one fails.
    tls_args=(--resolve "${host}:${port}:${ip}" --cacert "${work_dir}/cert.pem")
    retry 60 expect_code 200 "${tls_args[@]}" "https://${host}:${port}/" \
        || die "https://${host}:${port}/ via ${ip} (${name}) never answered 200 with the Secret's certificate"
    tag="${run_id}-ingress-https-${name}"
    expect_all_ok "$(codes_from_host 6 "${tls_args[@]}" "https://${host}:${port}/?probe=${tag}-")" \
        "6 HTTPS requests via ${address} (${name})"
    expect_served "${tag}" 6
    ok "https://${host}/ via ${address} (${name}): 6 of 6, certificate verified"
done
redirect=$(curl -s -o /dev/null --max-time 5 -w '%{http_code} %{redirect_url}' \
    -H "Host: ${host}" "http://127.0.0.1:${http_port}/") || true
[[ "${redirect}" == "308 https://${host}"* ]] \
    || die "with TLS configured, http://${host}/ should redirect (308) to https, as ingress-nginx does; got '${redirect}'"
ok "http://${host}/ now redirects: ${redirect}"

step "DNS: a Service name resolves from a pod (CoreDNS, itself behind a ClusterIP)"
fqdn="myapp-svc.${ns}.svc.cluster.local"
lookup=$(retry 60 kc -n "${ns}" exec e2e-client -- nslookup -type=a "${fqdn}") \
    || die "nslookup ${fqdn} failed in the client pod"
printf '%s\n' "${lookup}" | sed 's/^/    /'
awk '/^Address/ { print $NF }' <<<"${lookup}" | grep -qxF "${cluster_ip}" \
    || die "${fqdn} did not resolve to the ClusterIP ${cluster_ip}"
expect_all_ok "$(codes_from_pod "http://myapp-svc/?probe=${run_id}-byname-" 4)" "4 requests to http://myapp-svc/ (by name) from the client pod"
expect_served "${run_id}-byname" 4
ok "${fqdn} -> ${cluster_ip}, and http://myapp-svc/ answers"

step "Delete a pod: traffic moves to its replacement"
read -r victim survivor <<<"$(myapp_pods | tr '\n' ' ')"
victim_ip=$(kc -n "${ns}" get pod "${victim}" -o 'jsonpath={.status.podIP}')
survivor_ip=$(kc -n "${ns}" get pod "${survivor}" -o 'jsonpath={.status.podIP}')
info "deleting ${victim} (${victim_ip}); ${survivor} (${survivor_ip}) stays"
kc -n "${ns}" delete pod "${victim}" --wait=true --timeout=120s
kc -n "${ns}" rollout status deployment/myapp --timeout=180s || die "the Deployment did not replace ${victim}"
replacement=$(myapp_pods | grep -vx -e "${victim}" -e "${survivor}" | head -n 1) || true
[[ -n "${replacement}" ]] || die "no replacement pod for ${victim}"
replacement_ip=$(kc -n "${ns}" get pod "${replacement}" -o 'jsonpath={.status.podIP}')
info "replacement: ${replacement} (${replacement_ip})"
want_endpoints=$(printf '%s\n' "${survivor_ip}" "${replacement_ip}" | sort | tr '\n' ' ')
retry 60 endpoints_are "${want_endpoints}" \
    || die "the EndpointSlices of myapp-svc never listed exactly these ready endpoints: ${want_endpoints}(now: $(ready_endpoints))"
ok "EndpointSlice: ${want_endpoints}"
# kproxy follows within its sync period; give it a few batches.
deadline=$((SECONDS + 60))
attempt=0
while true; do
    attempt=$((attempt + 1))
    tag="${run_id}-moved${attempt}"
    codes=$(codes_from_pod "http://${cluster_ip}/?probe=${tag}-" 10)
    report=$(served "${tag}")
    if all_ok "${codes}" && awk -v p="${replacement}" '$1 == p && $2 > 0 { f = 1 } END { exit !f }' <<<"${report}"; then
        break
    fi
    if ((SECONDS >= deadline)); then
        info "last batch: $(tr '\n' ' ' <<<"${codes}")"
        die "after deleting ${victim}, requests to ${cluster_ip} did not all succeed or never reached ${replacement}"
    fi
    sleep 3
done
expect_served "${tag}" 10
ok "all 10 requests answered, ${replacement} among the answering pods; nothing went to ${victim_ip}"

step "Cleaning up"
if [[ "${keep}" == true ]]; then
    info "--keep: namespace ${ns} and IngressClass nginx left in place"
else
    kc delete namespace "${ns}" --wait=false
    kc delete -f "${repo_root}/manifests/extras/ingressclass-nginx.yaml" --ignore-not-found
fi

printf '\n%s%sAll %d steps passed%s with kproxy in %s mode on kind cluster %s.\n' \
    "${bold}" "${green}" "${step_count}" "${reset}" "${proxy_mode}" "${cluster_name}"
