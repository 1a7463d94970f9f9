#!/usr/bin/env bash
# Benchmark: IPVS mode at N Services x 10 endpoints, inside the qemu guest of scripts/ipvs-vm.sh
# (this host's kernel has no IPVS). The guest is emulated (TCG), so its absolute speed means
# nothing: the figures are kproxy's own CPU time (utime + stime from /proc) per sync, and the
# ratio of each size's to the smallest size's. Memory (VmHWM, VmRSS) does not depend on speed
# and is reported as measured.
#
# For each size, in a network namespace of the guest: the standalone fake API server
# (`integration __fakeapi --shape minimal`: the shape only changes the lists, not the syncs)
# and kproxy --proxy-mode ipvs through the API path. Measured:
#   - first sync: kproxy's CPU from its start to the first full sync (includes the lists);
#   - full sync: CPU across a full resync forced by a change of this node's addresses;
#   - partial sync: CPU across one EndpointSlice change (kproxy's own partial-sync metric too);
# Writes its section of BENCHMARKS.md. Release builds (KPROXY_VM_RELEASE=1 of ipvs-vm.sh).
#
# usage: sudo scripts/bench-ipvs-vm.sh [SIZES]   (default "1000 5000 10000")
# env: KPROXY_BENCH_NO_WRITE=1 prints without touching BENCHMARKS.md; KPROXY_VM_TIMEOUT
#      (default 5400 s for the whole guest run); KPROXY_BENCH_PERF=1 profiles the largest size's
#      full and partial sync with perf (printed as @@PERF lines in target/ipvs-vm/console.log).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
sizes=${1:-1000 5000 10000}
[ "$(id -u)" = 0 ] || { echo "bench-ipvs-vm.sh: needs root" >&2; exit 1; }

# The guest's part: busybox sh, with ip, curl and the two binaries in /test.
guest=$(cat <<'GUEST'
cd /test
# busybox's sh runs its own ip applet whatever PATH says, and that one has no netns.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks (USER_HZ = 100)
kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
metric() { /usr/sbin/ip netns exec bench curl -s --max-time 5 http://127.0.0.1:10249/metrics | awk -v n="$1" '$1 == n {print $2}'; }
wait_metric() { # NAME MIN
  while :; do
    c=$(metric "$1"); c=${c%.*}
    [ -n "$c" ] && [ "$c" -ge "$2" ] && return 0
    kill -0 "$kp" 2>/dev/null || { echo "kproxy exited"; tail -30 /tmp/kp.log; return 1; }
    sleep 1
  done
}
# With PERF set, the largest size's full and partial syncs are profiled (kproxy's user and
# kernel time, by symbol) and the top of each profile is printed.
profile_start() {
  [ -n "$PERF" ] && [ "$n" = "$last_size" ] && command -v perf >/dev/null || return 0
  perf record -q -e cpu-clock -F 499 -p "$kp" -o "/tmp/perf-$1.data" > /dev/null 2>&1 &
  perf_pid=$!
  sleep 1
}
profile_end() {
  [ -n "${perf_pid:-}" ] || return 0
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null
  perf_pid=
  perf report -i "/tmp/perf-$1.data" --stdio --no-children --sort dso,sym 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -25 | sed "s/^/@@PERF $1 $n /; s/\$/@@/"
}
for s in $SIZES; do last_size=$s; done
for n in $SIZES; do
  /usr/sbin/ip netns add bench
  /usr/sbin/ip netns exec bench ip link set lo up
  /usr/sbin/ip netns exec bench ./integration __fakeapi --listen 127.0.0.1:6443 --services "$n" --endpoints 10 \
    --node bench-node --shape minimal > /tmp/api.log 2>&1 &
  api=$!
  until grep -q '^fakeapi: serving' /tmp/api.log; do sleep 1; done
  start=$(cut -d' ' -f1 /proc/uptime)
  # The IPVS dataplane's debug line per sync says how long each step took.
  /usr/sbin/ip netns exec bench env RUST_LOG=info,kproxy::dataplane::ipvs=debug ./kproxy --master http://127.0.0.1:6443 --hostname-override bench-node --proxy-mode ipvs \
    --cluster-cidr 10.128.0.0/9 --sync-period 1h --ipvs-sync-period 1h --min-sync-period 0s --ipvs-min-sync-period 0s \
    --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/kp.log 2>&1 &
  kp=$!
  wait_metric kubeproxy_sync_full_proxy_rules_duration_seconds_count 1 || exit 1
  first_wall=$(awk -v s="$start" '{print $1 - s}' /proc/uptime)
  first_cpu=$(cpu "$kp")
  first_sync=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
  sleep 5
  # A full resync: this node's addresses change.
  c0=$(cpu "$kp"); s0=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
  profile_start full
  /usr/sbin/ip netns exec bench curl -sf -o /dev/null -X PATCH -H 'Content-Type: application/merge-patch+json' \
    --data '{"status":{"addresses":[{"type":"InternalIP","address":"192.0.2.1"},{"type":"InternalIP","address":"192.0.2.2"}]}}' \
    http://127.0.0.1:6443/api/v1/nodes/bench-node/status
  wait_metric kubeproxy_sync_full_proxy_rules_duration_seconds_count 2 || exit 1
  full_cpu=$(( $(cpu "$kp") - c0 ))
  profile_end full
  full_sync=$(awk -v a="$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)" -v b="$s0" 'BEGIN {print a - b}')
  sleep 5
  # A partial sync: one EndpointSlice of the last Service.
  last=$((n - 1))
  c0=$(cpu "$kp"); p0=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_count); p0=${p0%.*}
  ps0=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)
  profile_start partial
  /usr/sbin/ip netns exec bench curl -sf -o /dev/null -X PATCH -H 'Content-Type: application/merge-patch+json' \
    --data '{"endpoints":[{"addresses":["10.255.0.1"],"conditions":{"ready":true}}]}' \
    "http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/ns-$((last % 10))/endpointslices/svc-$last-ep"
  wait_metric kubeproxy_sync_partial_proxy_rules_duration_seconds_count $(( ${p0:-0} + 1 )) || exit 1
  partial_cpu=$(( $(cpu "$kp") - c0 ))
  profile_end partial
  partial_sync=$(awk -v a="$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)" -v b="${ps0:-0}" 'BEGIN {print a - b}')
  /usr/sbin/ip netns exec bench ipvsadm -Ln | grep -q '10.255.0.1:8080' || echo "warning: the changed endpoint is not in IPVS"
  vs=$(/usr/sbin/ip netns exec bench ipvsadm -Ln | grep -c '^TCP')
  grep -a 'IPVS sync steps' /tmp/kp.log | sed 's/^.*IPVS sync steps: /@@STEPS '"$n"' /; s/$/@@/' | tail -4
  echo "@@BENCH services=$n virtual_services=$vs first_wall_s=$first_wall first_cpu_ticks=$first_cpu first_sync_s=$first_sync full_cpu_ticks=$full_cpu full_sync_s=$full_sync partial_cpu_ticks=$partial_cpu partial_sync_s=$partial_sync peak_kib=$(kib "$kp" VmHWM) steady_kib=$(kib "$kp" VmRSS)@@"
  kill "$kp"; wait "$kp"
  kill "$api"; wait "$api"
  /usr/sbin/ip netns del bench
done
GUEST
)

export KPROXY_VM_RELEASE=1 KPROXY_VM_TIMEOUT=${KPROXY_VM_TIMEOUT:-5400}
KPROXY_VM_RUN="SIZES='$sizes' PERF='${KPROXY_BENCH_PERF:-}'
$guest" "$here/scripts/ipvs-vm.sh" || true
log=$here/target/ipvs-vm/console.log
grep -a '@@BENCH' "$log" > /dev/null || { echo "bench-ipvs-vm.sh: no figures from the guest (see $log)" >&2; exit 1; }

python3 - "$log" "$here/target/ipvs-vm/section.md" "$(date -u +%Y-%m-%d)" "$sizes" <<'PY'
import sys, re
log, out, day, sizes = sys.argv[1:5]
rows = []
for line in open(log, errors="replace"):
    m = re.search(r"@@BENCH (.*)@@", line)
    if m:
        rows.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
base = rows[0]
ratio = lambda r, k: float(r[k]) / max(float(base[k]), 1)
lines = [
    f"Written by `scripts/bench-ipvs-vm.sh \"{sizes}\"` on {day}: IPVS mode through the API path inside the",
    "emulated (TCG) guest of scripts/ipvs-vm.sh, release builds, 10 endpoints per Service, every tenth",
    "a NodePort. CPU is kproxy's own (utime + stime, 10 ms ticks) per sync; the guest's absolute speed",
    f"means nothing, so each is also given as a ratio to the {int(base['services']):,}-Service run. The full",
    "sync is forced by a change of the node's addresses; the partial one by one EndpointSlice.",
    "",
    "| Services | virtual services | first sync CPU (with the lists) | full sync CPU | ratio | partial sync CPU | ratio | peak / steady RSS |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for r in rows:
    lines.append(
        f"| {int(r['services']):,} | {int(r['virtual_services']):,} | {int(r['first_cpu_ticks']) / 100:.2f} s | "
        f"{int(r['full_cpu_ticks']) / 100:.2f} s | {ratio(r, 'full_cpu_ticks'):.1f} | "
        f"{int(r['partial_cpu_ticks']) / 100:.2f} s | {ratio(r, 'partial_cpu_ticks'):.1f} | "
        f"{int(r['peak_kib']) / 1024:.0f} / {int(r['steady_kib']) / 1024:.0f} MiB |")
open(out, "w").write("\n".join(lines) + "\n")
PY
cat "$here/target/ipvs-vm/section.md"
[ -z "${KPROXY_BENCH_NO_WRITE:-}" ] || exit 0
python3 - "$here/BENCHMARKS.md" "$here/target/ipvs-vm/section.md" <<'PY'
import sys
path, section = sys.argv[1], open(sys.argv[2]).read().strip()
begin, end = "<!-- scripts/bench-ipvs-vm.sh: begin -->", "<!-- scripts/bench-ipvs-vm.sh: end -->"
text = open(path).read()
if begin not in text:
    text = text.rstrip() + "\n\n## IPVS mode at scale (qemu guest)\n\n" + begin + "\n" + end + "\n"
head, _, tail = text.partition(begin)
_, _, tail = tail.partition(end)
open(path, "w").write(head + begin + "\n" + section + "\n" + end + tail)
PY
