#!/usr/bin/env bash
# Delete the kind cluster made by scripts/kind-up.sh (nodes, kubectl context).
# The kproxy:dev image stays in the local Docker image store.
#
#   scripts/kind-down.sh [--name kproxy]
set -Eeuo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-kind.sh
source "${script_dir}/lib-kind.sh"

cluster_name=kproxy
while (($# > 0)); do
    case "$1" in
        --name) cluster_name=${2:?--name needs a value}; shift 2 ;;
        -h | --help) echo "Usage: $0 [--name NAME]   (default name: kproxy)"; exit 0 ;;
        *) die "unknown argument: $1 (usage: $0 [--name NAME])" ;;
    esac
done

step "Deleting kind cluster '${cluster_name}'"
require_tools kind
if cluster_exists; then
    kind delete cluster --name "${cluster_name}"
    ok "deleted"
else
    ok "no kind cluster named '${cluster_name}': nothing to do"
fi
