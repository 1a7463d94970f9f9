#!/usr/bin/env bash
# Create a kind cluster without kube-proxy (1 control plane, 2 workers), build
# the kproxy image, load it, and deploy kproxy as the cluster's Service proxy.
# Run again on the same cluster to rebuild and redeploy, or to switch mode.
#
#   scripts/kind-up.sh [--name kproxy] [--proxy-mode iptables|ipvs|nftables]
#
# Needs docker (with its engine running), kind (v0.20 or newer, for
# kubeProxyMode: none) and kubectl. Every kubectl call names the cluster's
# context (kind-NAME); kind itself makes that context current on creation.
set -Eeuo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-kind.sh
source "${script_dir}/lib-kind.sh"

usage() {
    cat <<EOF
Usage: $0 [options]

  --name NAME            kind cluster name (default: kproxy)
  --proxy-mode MODE      iptables (default), ipvs or nftables
  --node-image IMAGE     kindest/node image (default: kind's own default)
  --http-port PORT       host port forwarded to Ingress HTTP on the control
                         plane (default: 80)
  --https-port PORT      host port forwarded to Ingress HTTPS (default: 443)
  -h, --help             this help

Host ports are bound on 127.0.0.1 and fixed when the cluster is created:
NodePort 30080, and the two Ingress ports above.
EOF
}

cluster_name=kproxy
proxy_mode=iptables
node_image=""
http_port=80
https_port=443
while (($# > 0)); do
    case "$1" in
        --name) cluster_name=${2:?--name needs a value}; shift 2 ;;
        --proxy-mode) proxy_mode=${2:?--proxy-mode needs a value}; shift 2 ;;
        --node-image) node_image=${2:?--node-image needs a value}; shift 2 ;;
        --http-port) http_port=${2:?--http-port needs a value}; shift 2 ;;
        --https-port) https_port=${2:?--https-port needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

work_dir=$(mktemp -d)
trap 'rm -rf "${work_dir}"' EXIT

step "Checking prerequisites"
check_proxy_mode "${proxy_mode}"
require_tools docker kind kubectl
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' fails)"
ok "docker, kind and kubectl found; proxy mode ${proxy_mode}"

step "Creating kind cluster '${cluster_name}' with kube-proxy disabled"
reused=false
if cluster_exists; then
    reused=true
    info "cluster '${cluster_name}' exists: reusing it (scripts/kind-down.sh --name ${cluster_name} to start over)"
else
    image_line=""
    if [[ -n "${node_image}" ]]; then
        image_line="    image: ${node_image}"
    fi
    # The pod subnet is the clusterCIDR in manifests/20-config.yaml.
    cat >"${work_dir}/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  kubeProxyMode: "none"
  podSubnet: "10.244.0.0/16"
  serviceSubnet: "10.96.0.0/16"
nodes:
  - role: control-plane
${image_line}
    # kproxy runs on every node (its DaemonSet tolerates all taints), so the
    # control plane answers NodePorts and Ingress like the workers do. These
    # mappings make it reachable from the host on macOS/Windows too; on Linux
    # the host also reaches every node's own IP directly.
    extraPortMappings:
      - containerPort: 30080
        hostPort: 30080
        listenAddress: "127.0.0.1"
        protocol: TCP
      - containerPort: 80
        hostPort: ${http_port}
        listenAddress: "127.0.0.1"
        protocol: TCP
      - containerPort: 443
        hostPort: ${https_port}
        listenAddress: "127.0.0.1"
        protocol: TCP
  - role: worker
${image_line}
  - role: worker
${image_line}
EOF
    kind create cluster --name "${cluster_name}" --config "${work_dir}/kind.yaml"
fi
if kc -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "cluster '${cluster_name}' runs kube-proxy; it was not made by this script. Delete it (scripts/kind-down.sh --name ${cluster_name}) and run again"
fi
ok "cluster '${cluster_name}' is up, without kube-proxy"

step "Building image ${kproxy_image}"
docker build -t "${kproxy_image}" "${repo_root}"
ok "built ${kproxy_image}"

step "Loading ${kproxy_image} into the cluster's nodes"
if ! kind load docker-image "${kproxy_image}" --name "${cluster_name}"; then
    # Docker's containerd image store can make `load docker-image` fail on
    # multi-platform manifests; an archive of the one image always loads.
    info "kind load docker-image failed; retrying through an image archive"
    docker save -o "${work_dir}/kproxy.tar" "${kproxy_image}"
    kind load image-archive "${work_dir}/kproxy.tar" --name "${cluster_name}"
fi
ok "loaded"

step "Pointing kproxy at the API server directly (ConfigMap kproxy-apiserver)"
# The control plane's node IP: the API server listens there on 6443 and its
# certificate names it (kubeadm adds the advertise address; the container
# name ${cluster_name}-control-plane is in it too, but a name would need DNS,
# and cluster DNS needs kproxy first).
control_plane="${cluster_name}-control-plane"
if ! apiserver_host=$(retry 60 kc get node "${control_plane}" \
    -o 'jsonpath={.status.addresses[?(@.type=="InternalIP")].address}'); then
    die "node ${control_plane} did not register"
fi
apiserver_host=${apiserver_host%% *}
[[ -n "${apiserver_host}" ]] || die "node ${control_plane} has no InternalIP"
kc -n kube-system create configmap kproxy-apiserver \
    --from-literal=KUBERNETES_SERVICE_HOST="${apiserver_host}" \
    --from-literal=KUBERNETES_SERVICE_PORT=6443 \
    --dry-run=client -o yaml | kc apply -f -
ok "KUBERNETES_SERVICE_HOST=${apiserver_host} KUBERNETES_SERVICE_PORT=6443"

step "Applying manifests/ with mode ${proxy_mode}"
mkdir -p "${work_dir}/manifests"
cp "${repo_root}"/manifests/*.yaml "${work_dir}/manifests/"
config="${work_dir}/manifests/20-config.yaml"
sed -i.orig "s/^    mode: .*/    mode: ${proxy_mode}/" "${config}"
rm -f "${config}.orig"
[[ $(grep -c "^    mode: ${proxy_mode}\$" "${config}") == 1 ]] \
    || die "could not set the mode in ${config}: expected one '    mode:' line in manifests/20-config.yaml"
kc apply -f "${work_dir}/manifests"
if [[ "${reused}" == true ]]; then
    # Same image tag and maybe a new config: restart to pick both up.
    kc -n kube-system rollout restart daemonset/kproxy
fi
ok "applied"

step "Waiting for the kproxy DaemonSet to roll out on every node"
kc -n kube-system rollout status daemonset/kproxy --timeout=300s \
    || die "kproxy did not become ready on every node"
kc -n kube-system get pods -l k8s-app=kproxy -o wide

step "Waiting for the nodes and CoreDNS (CoreDNS reaches the API through the kubernetes ClusterIP)"
kc wait --for=condition=Ready nodes --all --timeout=300s \
    || die "nodes did not become Ready (the CNI, kindnet, reaches the API through kproxy too)"
kc -n kube-system rollout status deployment/coredns --timeout=300s \
    || die "CoreDNS did not become ready: ClusterIPs are not working"
ok "CoreDNS is ready, so ClusterIP traffic works"

cat <<EOF

${bold}kproxy is running in ${proxy_mode} mode on kind cluster '${cluster_name}'.${reset}

Try next:
  kubectl --context kind-${cluster_name} -n kube-system get pods -l k8s-app=kproxy -o wide
  kubectl --context kind-${cluster_name} -n kube-system logs daemonset/kproxy
  scripts/kind-e2e.sh --name ${cluster_name} --proxy-mode ${proxy_mode}   # the Ingress walkthrough, end to end

From the host: a NodePort Service with nodePort 30080 answers on
http://127.0.0.1:30080/ (and on every node's IP on Linux, see
'kubectl get nodes -o wide'); Ingresses answer on http://127.0.0.1:${http_port}/ and
https://127.0.0.1:${https_port}/ (curl --resolve HOST:${https_port}:127.0.0.1 https://HOST:${https_port}/).

Switch mode:  scripts/kind-up.sh --name ${cluster_name} --proxy-mode ipvs
Delete:       scripts/kind-down.sh --name ${cluster_name}
EOF
