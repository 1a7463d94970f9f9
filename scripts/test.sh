#!/usr/bin/env bash
# kproxy's test command (what .ci/run calls): unit tests, manifest validation, the
# network-namespace integration tests with real packets (root; as non-root they are listed as
# ignored), the static checks of the deployment scripts, and, as root, the IPVS scenarios in a
# qemu guest booting Debian's kernel (this kernel has no IPVS; KPROXY_SKIP_VM=1 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
bash scripts/check-deploy.sh
# Every fuzz target for a bounded time (scripts/fuzz.sh SECONDS for longer runs).
scripts/fuzz.sh "${KPROXY_FUZZ_SECONDS:-10}"
if [ "$(id -u)" = 0 ] && [ -z "${KPROXY_SKIP_VM:-}" ]; then
  scripts/ipvs-vm.sh
fi
