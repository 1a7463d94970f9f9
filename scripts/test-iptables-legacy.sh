#!/usr/bin/env bash
# The iptables-mode integration scenarios (real packets in network namespaces) with the
# iptables-legacy backend, where kproxy's partial syncs go through its native writer
# (src/dataplane/iptables/native): a directory of `iptables*` links to the `*-legacy` tools goes
# first on PATH, for kproxy and for the scenarios' own iptables-save alike. The runs of
# iptables-restore are counted and printed: with KPROXY_IPTABLES_NATIVE=0 (every sync through
# iptables-restore) the count shows how many syncs the native writer took.
#
# usage: sudo scripts/test-iptables-legacy.sh [FILTER]   (default filter: `iptables::`)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-iptables-legacy.sh: needs root (network namespaces)" >&2; exit 1; }
command -v iptables-legacy-restore > /dev/null || { echo "test-iptables-legacy.sh: no iptables-legacy" >&2; exit 1; }
tools=$(mktemp -d /tmp/kproxy-legacy-tools.XXXXXX)
trap 'rm -rf "$tools"' EXIT
for t in iptables iptables-save ip6tables ip6tables-save ip6tables-restore; do
  ln -s "$(command -v "${t/tables/tables-legacy}")" "$tools/$t"
done
# iptables-restore counts its runs, so that the script can tell how many syncs went native.
cat > "$tools/iptables-restore" <<WRAPPER
#!/bin/sh
echo run >> "$tools/restores"
exec $(command -v iptables-legacy-restore) "\$@"
WRAPPER
chmod +x "$tools/iptables-restore"
PATH="$tools:$PATH" KPROXY_TEST_MODES=iptables cargo test --locked --test integration -- "${1:-iptables::}"
echo "test-iptables-legacy.sh: iptables-restore ran $(wc -l < "$tools/restores" 2>/dev/null || echo 0) times"
