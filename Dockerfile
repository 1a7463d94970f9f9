# syntax=docker/dockerfile:1.7
#
# kproxy's node image: the kproxy binary, plus the userspace tools its proxy
# modes call: iptables (both the nft and the legacy backend, behind a wrapper
# that picks the one the host already uses, as kube-proxy's image does),
# nftables (only for IPVS mode's companion table: nftables mode talks to
# nf_tables over netlink and never runs nft), conntrack (for an operator's
# debugging: kproxy deletes stale entries over netlink), and kmod for loading
# IPVS modules.
#
#   docker build -t kproxy:dev .
#
# Reproducible from the repo: the toolchain and Debian release are pinned
# below, dependencies come from Cargo.lock (--locked), and only Cargo.toml,
# Cargo.lock and src/ are copied (cargo needs no test or bench sources to build
# the binary). scripts/check-deploy.sh checks that every COPY source exists.
# The heredoc scripts below need BuildKit (the default builder since Docker 23).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The cache mounts keep the registry and incremental target dir between builds
# (kind-up.sh rebuilds on every run); the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kproxy \
 && install -D -m 0755 target/release/kproxy /out/kproxy

FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates conntrack iptables kmod nftables \
 && rm -rf /var/lib/apt/lists/*

# iptables-wrapper: Debian's iptables package ships both backends
# (iptables-nft and iptables-legacy). Rules written with the wrong one are
# invisible to the other and ordered wrongly against the host's own, so on its
# first call the wrapper finds which backend the host uses (the kubelet's hint
# chains, else whichever holds more rules), points iptables, iptables-save,
# iptables-restore and their ip6tables twins at that backend, and runs the
# command. Later calls go straight to the chosen binaries. Set
# KPROXY_IPTABLES_BACKEND=nft or =legacy in the container to skip detection.
COPY --chmod=0755 <<'EOF' /usr/sbin/iptables-wrapper
#!/bin/sh
set -eu

sbin=/usr/sbin

has_hint() { # $1: backend. The kubelet creates these chains with the backend it uses.
    for family in iptables ip6tables; do
        if "${sbin}/${family}-$1-save" -t mangle 2>/dev/null \
            | grep -q -e '^:KUBE-IPTABLES-HINT' -e '^:KUBE-KUBELET-CANARY'; then
            return 0
        fi
    done
    return 1
}

count_rules() { # $1: backend. Prints how many rules it holds, both families.
    {
        "${sbin}/iptables-$1-save" 2>/dev/null || true
        "${sbin}/ip6tables-$1-save" 2>/dev/null || true
    } | grep -c '^-' || true
}

detect_backend() {
    case "${KPROXY_IPTABLES_BACKEND:-}" in
        nft | legacy) echo "${KPROXY_IPTABLES_BACKEND}"; return ;;
        "") ;;
        *) echo "iptables-wrapper: KPROXY_IPTABLES_BACKEND must be nft or legacy" >&2; exit 1 ;;
    esac
    # nft first: looking at legacy tables makes the kernel load the legacy
    # modules, which a host that never used them is better without.
    if has_hint nft; then echo nft; return; fi
    if has_hint legacy; then echo legacy; return; fi
    if [ "$(count_rules legacy)" -gt "$(count_rules nft)" ]; then echo legacy; else echo nft; fi
}

# iptables-restore -> iptables-<backend>-restore, ip6tables -> ip6tables-<backend>
backend_binary() { # $1: command name, $2: backend
    case "$1" in
        iptables | ip6tables) echo "${sbin}/$1-$2" ;;
        iptables-save | iptables-restore | ip6tables-save | ip6tables-restore)
            echo "${sbin}/${1%-*}-$2-${1##*-}" ;;
        *) echo "iptables-wrapper: called as unknown command $1" >&2; exit 1 ;;
    esac
}

cmd=$(basename "$0")
backend=$(detect_backend)

# Repoint every wrapped name. Each link is replaced by rename(2), so a
# concurrent call never finds the name missing. Best effort: whatever happens
# here, this call still execs the backend binary directly, never itself.
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    target=$(backend_binary "${name}" "${backend}")
    if ! { ln -sf "${target}" "${sbin}/.${name}.$$" && mv -f "${sbin}/.${name}.$$" "${sbin}/${name}"; } 2>/dev/null; then
        rm -f "${sbin}/.${name}.$$"
    fi
done

exec "$(backend_binary "${cmd}" "${backend}")" "$@"
EOF
RUN for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do \
      ln -sf /usr/sbin/iptables-wrapper "/usr/sbin/${name}"; \
    done \
 && /usr/sbin/iptables-nft --version && /usr/sbin/iptables-legacy --version

# kproxy-node-prep: run by the DaemonSet's privileged init container before
# kproxy starts, so that kproxy itself can run unprivileged (which sees
# /proc/sys read-only). Reads the mode from the KubeProxyConfiguration file,
# loads that mode's kernel modules and sets the sysctls kube-proxy would set.
COPY --chmod=0755 <<'EOF' /usr/local/bin/kproxy-node-prep
#!/bin/sh
set -eu

config=${1:-/etc/kproxy/config.conf}

# Top-level `mode:` and `ipvs.strictARP:` of a KubeProxyConfiguration; an
# empty mode means iptables, as in kube-proxy.
mode=$(sed -n 's/^mode:[[:space:]]*["'\'']\{0,1\}\([a-z]*\).*/\1/p' "${config}" | head -n 1)
mode=${mode:-iptables}
strict_arp=false
if grep -Eq '^[[:space:]]+strictARP:[[:space:]]*true' "${config}"; then strict_arp=true; fi

set_sysctl() { # $1: name in dotted form, $2: value
    path="/proc/sys/$(echo "$1" | tr . /)"
    if [ ! -e "${path}" ]; then
        echo "kproxy-node-prep: ${1} does not exist on this kernel, not set" >&2
        return 0
    fi
    echo "$2" >"${path}"
    echo "kproxy-node-prep: ${1}=${2}"
}

load_modules() {
    for module in "$@"; do
        if ! modprobe -- "${module}"; then
            # Built into the kernel, or a kernel without it: kproxy reports the
            # latter clearly when it starts.
            echo "kproxy-node-prep: could not load ${module}" >&2
        fi
    done
}

echo "kproxy-node-prep: mode ${mode}"
case "${mode}" in
    iptables)
        # Nothing: kproxy does not serve NodePorts on 127.0.0.1, so it needs no
        # route_localnet (CVE-2020-8558), and iptables loads its own modules.
        ;;
    ipvs)
        load_modules ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack
        # IPVS must keep conntrack entries for the masquerade rules to match.
        set_sysctl net.ipv4.vs.conntrack 1
        # Drop connections to real servers that are gone, and stale persistence.
        set_sysctl net.ipv4.vs.expire_nodest_conn 1
        set_sysctl net.ipv4.vs.expire_quiescent_template 1
        if [ "${strict_arp}" = true ]; then
            set_sysctl net.ipv4.conf.all.arp_ignore 1
            set_sysctl net.ipv4.conf.all.arp_announce 2
        fi
        ;;
    nftables)
        load_modules nf_tables
        ;;
    *)
        echo "kproxy-node-prep: unknown mode '${mode}' in ${config}" >&2
        exit 2
        ;;
esac
EOF

COPY --from=build /out/kproxy /usr/local/bin/kproxy
ENTRYPOINT ["/usr/local/bin/kproxy"]
