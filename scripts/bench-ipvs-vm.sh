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
# env: KPROXY_BENCH_NO_WRITE=1 prints without touching BENCHMARKS.md; KPROXY_BENCH_KPROXY and
#      KPROXY_BENCH_FAKEAPI: binaries already built to use instead of building them (the fake
#      API server's speed does not enter kproxy's CPU; a debug build serves); KPROXY_BENCH_PROFILE
#      names kproxy's build profile in the text (default "release"); KPROXY_BENCH_PARTIALS (5)
#      one-EndpointSlice changes per size; KPROXY_BENCH_BEFORE another kproxy binary (e.g. the
#      commit before a change) run at each size right before this one, in the same boot;
#      KPROXY_BENCH_THEN_TEST=1 runs the ipvs:: scenarios after the figures, in the same boot;
#      KPROXY_VM_TIMEOUT
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
# Syncs are awaited in kproxy's log (one info line per sync), not by scraping its metrics:
# every scrape is kproxy's CPU too, and a slow sync would be charged for more of them.
syncs() { grep -ac "synced $1 proxy rules" /tmp/kp.log; }
wait_sync() { # full|partial MIN
  while :; do
    [ "$(syncs "$1")" -ge "$2" ] && return 0
    kill -0 "$kp" 2>/dev/null || { echo "kproxy exited"; tail -30 /tmp/kp.log; return 1; }
    sleep 0.2
  done
}
# With PERF set, the largest size's full and partial syncs are profiled (kproxy's user and
# kernel time, by symbol) and the top of each profile is printed.
profile_start() {
  [ -n "$PERF" ] && [ "$n" = "$last_size" ] && [ "$bin" = kproxy ] && command -v perf >/dev/null || return 0
  perf record -q -e cpu-clock -F 499 -p "$kp" -o "/tmp/perf-$1.data" > /dev/null 2>&1 &
  perf_pid=$!
  sleep 1
}
profile_end() {
  [ -n "${perf_pid:-}" ] || return 0
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null
  perf_pid=
  perf report -i "/tmp/perf-$1.data" --stdio --no-children --sort dso,sym 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -25 | sed "s/^/@@PERF $bin $1 $n /; s/\$/@@/"
}
for s in $SIZES; do last_size=$s; done
# With a "before" binary, each size runs both, one after the other: the same load for both.
variants=kproxy
[ ! -x /test/kproxy-before ] || variants="kproxy-before kproxy"
for n in $SIZES; do
for bin in $variants; do
  /usr/sbin/ip netns add bench
  /usr/sbin/ip netns exec bench ip link set lo up
  /usr/sbin/ip netns exec bench ./integration __fakeapi --listen 127.0.0.1:6443 --services "$n" --endpoints 10 \
    --node bench-node --shape minimal > /tmp/api.log 2>&1 &
  api=$!
  until grep -q '^fakeapi: serving' /tmp/api.log; do sleep 1; done
  start=$(cut -d' ' -f1 /proc/uptime)
  # The IPVS dataplane's debug line per sync says how long each step took.
  /usr/sbin/ip netns exec bench env RUST_LOG=info,kproxy::dataplane::ipvs=debug "./$bin" --master http://127.0.0.1:6443 --hostname-override bench-node --proxy-mode ipvs \
    --cluster-cidr 10.128.0.0/9 --sync-period 1h --ipvs-sync-period 1h --min-sync-period 0s --ipvs-min-sync-period 0s \
    --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/kp.log 2>&1 &
  kp=$!
  wait_sync full 1 || exit 1
  first_wall=$(awk -v s="$start" '{print $1 - s}' /proc/uptime)
  first_cpu=$(cpu "$kp")
  first_kib=$(kib "$kp" VmRSS)
  first_sync=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
  sleep 5
  # A full resync: this node's addresses change.
  s0=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
  sleep 1
  c0=$(cpu "$kp")
  profile_start full
  /usr/sbin/ip netns exec bench curl -sf -o /dev/null -X PATCH -H 'Content-Type: application/merge-patch+json' \
    --data '{"status":{"addresses":[{"type":"InternalIP","address":"192.0.2.1"},{"type":"InternalIP","address":"192.0.2.2"}]}}' \
    http://127.0.0.1:6443/api/v1/nodes/bench-node/status
  wait_sync full 2 || exit 1
  full_cpu=$(( $(cpu "$kp") - c0 ))
  profile_end full
  full_sync=$(awk -v a="$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)" -v b="$s0" 'BEGIN {print a - b}')
  sleep 5
  # A partial sync: one EndpointSlice of the last Service.
  last=$((n - 1))
  ps0=$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)
  sleep 1
  c0=$(cpu "$kp"); p0=$(syncs partial)
  profile_start partial
  # PARTIALS changes one after the other (each awaited): the CPU per change is their mean,
  # finer than one change's 10 ms ticks.
  for i in $(seq 1 "$PARTIALS"); do
    /usr/sbin/ip netns exec bench curl -sf -o /dev/null -X PATCH -H 'Content-Type: application/merge-patch+json' \
      --data '{"endpoints":[{"addresses":["10.255.0.'"$i"'"],"conditions":{"ready":true}}]}' \
      "http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/ns-$((last % 10))/endpointslices/svc-$last-ep"
    wait_sync partial $(( p0 + i )) || exit 1
  done
  partial_cpu=$(( $(cpu "$kp") - c0 ))
  profile_end partial
  partial_sync=$(awk -v a="$(metric kubeproxy_sync_partial_proxy_rules_duration_seconds_sum)" -v b="${ps0:-0}" -v n="$PARTIALS" 'BEGIN {print (a - b) / n}')
  /usr/sbin/ip netns exec bench ipvsadm -Ln | grep -q "10.255.0.$PARTIALS:8080" || echo "warning: the changed endpoint is not in IPVS"
  vs=$(/usr/sbin/ip netns exec bench ipvsadm -Ln | grep -c '^TCP')
  grep -a 'IPVS sync steps' /tmp/kp.log | sed 's/^.*IPVS sync steps: /@@STEPS '"$bin $n"' /; s/$/@@/' | tail -8
  echo "@@BENCH variant=$bin services=$n virtual_services=$vs first_wall_s=$first_wall first_cpu_ticks=$first_cpu first_sync_s=$first_sync full_cpu_ticks=$full_cpu full_sync_s=$full_sync partial_cpu_ticks=$partial_cpu partials=$PARTIALS partial_sync_s=$partial_sync peak_kib=$(kib "$kp" VmHWM) steady_kib=$(kib "$kp" VmRSS) after_first_kib=$first_kib anon_kib=$(kib "$kp" RssAnon) file_kib=$(( $(kib "$kp" RssFile) + $(kib "$kp" RssShmem) ))@@"
  kill "$kp"; wait "$kp"
  kill "$api"; wait "$api"
  /usr/sbin/ip netns del bench
done
done
# The guest boots slowly: KPROXY_BENCH_THEN_TEST=1 runs the IPVS scenarios (those of
# scripts/ipvs-vm.sh) in the same boot, against this tree's kproxy.
if [ -n "$THEN_TEST" ]; then
  ./integration ipvs::
  echo "@@SCENARIOS rc=$?@@"
fi
GUEST
)

export KPROXY_VM_RELEASE=1 KPROXY_VM_TIMEOUT=${KPROXY_VM_TIMEOUT:-5400}
[ -z "${KPROXY_BENCH_FAKEAPI:-}" ] || export KPROXY_VM_TESTBIN=$KPROXY_BENCH_FAKEAPI
[ -z "${KPROXY_BENCH_KPROXY:-}" ] || export KPROXY_VM_KPROXY=$KPROXY_BENCH_KPROXY
[ -z "${KPROXY_BENCH_BEFORE:-}" ] || export KPROXY_VM_EXTRA_BINS="kproxy-before=$KPROXY_BENCH_BEFORE"
KPROXY_VM_RUN="SIZES='$sizes' PERF='${KPROXY_BENCH_PERF:-}' PARTIALS='${KPROXY_BENCH_PARTIALS:-5}' THEN_TEST='${KPROXY_BENCH_THEN_TEST:-}'
$guest" "$here/scripts/ipvs-vm.sh" || true
log=$here/target/ipvs-vm/console.log
if [ -n "${KPROXY_BENCH_THEN_TEST:-}" ]; then
  grep -a '@@SCENARIOS rc=0@@' "$log" > /dev/null && echo "bench-ipvs-vm.sh: the IPVS scenarios passed" >&2 ||
    echo "bench-ipvs-vm.sh: the IPVS scenarios FAILED or did not run (see $log)" >&2
fi
grep -a '@@BENCH' "$log" > /dev/null || { echo "bench-ipvs-vm.sh: no figures from the guest (see $log)" >&2; exit 1; }

python3 - "$log" "$here/target/ipvs-vm/section.md" "$(date -u +%Y-%m-%d)" "$sizes" "${KPROXY_BENCH_PROFILE:-release}" <<'PY'
import sys, re
log, out, day, sizes, profile = sys.argv[1:6]
rows = []
for line in open(log, errors="replace"):
    m = re.search(r"@@BENCH (.*)@@", line)
    if m:
        rows.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
bases = {}
for r in rows:
    bases.setdefault(r.get("variant", "kproxy"), r)
base = rows[0]
partial = lambda r: float(r["partial_cpu_ticks"]) / int(r.get("partials", 1))
ratio = lambda r, k: float(r[k]) / max(float(bases[r.get("variant", "kproxy")][k]), 1)
name = {"kproxy-before": "before", "kproxy": "this tree"}
two = len(bases) > 1
mib = lambda r, k: f"{int(r[k]) / 1024:.0f}"
lines = [
    f"Written by `scripts/bench-ipvs-vm.sh \"{sizes}\"` on {day}: IPVS mode through the API path inside the",
    f"emulated (TCG) guest of scripts/ipvs-vm.sh, kproxy built with the {profile} profile, 10 endpoints",
    "per Service, every tenth a NodePort. CPU is kproxy's own (utime + stime, 10 ms ticks) per sync,",
    "syncs awaited in its log (not by scraping its metrics, which is kproxy's CPU too); the guest's",
    f"absolute speed means nothing, so each is also given as a ratio to the {int(base['services']):,}-Service run.",
    "The full sync is forced by a change of the node's addresses; the partial one is the mean of",
    f"{base.get('partials', 1)} one-EndpointSlice changes in a row. RSS: after the first sync, peak (VmHWM), and",
    "steady (VmRSS after the partial syncs; in brackets RssFile + RssShmem, the mapped binary: the",
    "guest's root file system is in memory).",
    "",
    "| " + ("binary | " if two else "") + "Services | virtual services | first sync CPU (with the lists) | full sync CPU | ratio | partial sync CPU | ratio | RSS after first sync / peak / steady (file) |",
    "| " + ("--- | " if two else "") + "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for r in rows:
    lines.append(
        "| " + (name.get(r.get("variant"), r.get("variant", "")) + " | " if two else "") +
        f"{int(r['services']):,} | {int(r['virtual_services']):,} | {int(r['first_cpu_ticks']) / 100:.2f} s | "
        f"{int(r['full_cpu_ticks']) / 100:.2f} s | {ratio(r, 'full_cpu_ticks'):.1f} | "
        f"{partial(r) / 100:.3f} s | {partial(r) / max(partial(bases[r.get('variant', 'kproxy')]), 1):.1f} | "
        f"{mib(r, 'after_first_kib')} / {mib(r, 'peak_kib')} / {mib(r, 'steady_kib')} ({mib(r, 'file_kib')}) MiB |")
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
