#!/usr/bin/env bash
# kproxy's test command (what .ci/run calls): unit tests, manifest validation, the drop-in
# checks against kube-proxy v1.33's configuration and flags, the network-namespace integration
# tests with real packets (root; as non-root they are listed as ignored), the static checks of
# the deployment scripts, and, as root, the IPVS scenarios in a qemu guest booting Debian's
# kernel (this kernel has no IPVS; KPROXY_SKIP_VM=1 skips them).
#
# On a fresh machine it first installs, as root with apt, the tools the tests run (iptables,
# nftables, conntrack, iproute2, curl, python3, shellcheck) and says which it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib-setup.sh
. scripts/lib-setup.sh
ensure_cargo test.sh
if [ "$(id -u)" = 0 ]; then
  ensure_commands test.sh \
    iptables:iptables ip6tables:iptables iptables-restore:iptables iptables-legacy:iptables \
    nft:nftables conntrack:conntrack ip:iproute2 curl:curl python3:python3 \
    shellcheck:shellcheck update-ca-certificates:ca-certificates
else
  # The namespace tests need root and are skipped without it; the static checks need shellcheck.
  ensure_commands test.sh shellcheck:shellcheck
fi
cargo test --locked
if [ "$(id -u)" = 0 ]; then
  # iptables mode's scenarios again with the legacy backend (its native writer).
  scripts/test-iptables-legacy.sh
fi
bash scripts/check-deploy.sh
# Every fuzz target for a bounded time (scripts/fuzz.sh SECONDS for longer runs).
scripts/fuzz.sh "${KPROXY_FUZZ_SECONDS:-10}"
if [ "$(id -u)" = 0 ] && [ -z "${KPROXY_SKIP_VM:-}" ]; then
  scripts/ipvs-vm.sh
fi
