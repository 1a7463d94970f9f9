# shellcheck shell=bash
# Shared by scripts/kind-*.sh (sourced, not run): step banners, loud failure
# with diagnostics, kubectl bound to the cluster's context, waiting helpers.
# Callers set cluster_name before calling kc.

# shellcheck disable=SC2034 # used by the scripts that source this file
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034
kproxy_image=${KPROXY_IMAGE:-kproxy:dev}
# Every mode kproxy has (check-deploy.sh compares this with src/config/mod.rs).
proxy_modes="iptables ipvs nftables"

if [[ -t 1 ]]; then
    bold=$'\033[1m' red=$'\033[31m' green=$'\033[32m' reset=$'\033[0m'
else
    bold="" red="" green="" reset=""
fi

step_count=0
current_step="(setup)"

# step TITLE: start a numbered step; a failure from here on names it.
step() {
    step_count=$((step_count + 1))
    current_step=$*
    printf '\n%s==> [%d] %s%s\n' "${bold}" "${step_count}" "$*" "${reset}"
}

info() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s %s\n' "${green}" "${reset}" "$*"; }

# Print what helps explain a failure; never fails itself.
dump_diagnostics() {
    [[ -n "${cluster_name:-}" ]] || return 0
    kind get clusters 2>/dev/null | grep -qx "${cluster_name}" || return 0
    printf '\n%s--- diagnostics ---%s\n' "${bold}" "${reset}" >&2
    {
        kc get nodes -o wide
        kc get pods -A -o wide
        echo "--- kproxy logs (last 40 lines per pod) ---"
        kc -n kube-system logs -l k8s-app=kproxy --all-containers --prefix --tail=40
        if [[ -n "${diag_namespace:-}" ]]; then
            echo "--- events in ${diag_namespace} ---"
            kc -n "${diag_namespace}" get events --sort-by=.lastTimestamp
        fi
    } >&2 2>&1 || true
}

# die MESSAGE: fail the current step loudly.
die() {
    printf '\n%sFAILED%s at step %d (%s):\n    %s\n' "${red}" "${reset}" \
        "${step_count}" "${current_step}" "$*" >&2
    dump_diagnostics
    exit 1
}

# Any command that fails outside an if/||/&& ends the script through here.
on_err() {
    local status=$1 line=$2 command=$3
    trap - ERR
    die "command failed (exit ${status}, ${BASH_SOURCE[1]##*/} line ${line}): ${command}"
}
trap 'on_err $? ${LINENO} "${BASH_COMMAND}"' ERR

require_tools() {
    local tool
    for tool in "$@"; do
        command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' is not installed or not on PATH"
    done
}

check_proxy_mode() {
    [[ " ${proxy_modes} " == *" $1 "* ]] || die "--proxy-mode must be one of: ${proxy_modes} (got '$1')"
}

cluster_exists() {
    kind get clusters 2>/dev/null | grep -qx "${cluster_name}"
}

# kubectl against this cluster only, whatever the current context is.
kc() {
    kubectl --context "kind-${cluster_name}" "$@"
}

# The mode in the deployed kproxy ConfigMap (empty if not deployed).
deployed_proxy_mode() {
    kc -n kube-system get configmap kproxy -o 'jsonpath={.data.config\.conf}' 2>/dev/null \
        | sed -n 's/^mode:[[:space:]]*//p'
}

# retry SECONDS COMMAND...: run COMMAND every 2s until it succeeds; fail if it
# never does. Its output is shown only from the last attempt.
retry() {
    local timeout=$1 deadline output
    shift
    deadline=$((SECONDS + timeout))
    while true; do
        if output=$("$@" 2>&1); then
            [[ -z "${output}" ]] || printf '%s\n' "${output}"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            printf '%s\n' "${output}" >&2
            return 1
        fi
        sleep 2
    done
}
