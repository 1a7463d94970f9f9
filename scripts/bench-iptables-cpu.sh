#!/bin/bash
# Benchmark: iptables mode (legacy backend) through the API path, one size: bench-api.sh's
# measurement (first full sync, peak and steady RSS, one EndpointSlice change) plus the CPU
# split that bench-api.sh does not give: kproxy's own CPU and its waited-for children's
# (iptables-restore, iptables-save) from /proc/PID/stat, at the end of the first sync and
# around the change. Takes the binaries as arguments (no build), so it can run beside a build.
# Prints one line; writes nothing. Never run by the tests. KP_ENV=VAR=VALUE sets an environment
# variable for kproxy (e.g. MIMALLOC_PURGE_DELAY=0). CHANGES=N adds N more single changes and
# prints the p50 / p99 of their latency and CPU (BENCHMARKS.md's one-change percentiles);
# KPROXY_LOG=FILE keeps kproxy's log; STRACE=FILE writes an strace -f of kproxy and its children
# (execve, the iptables sockopts, flock, wait4) around the first change, with FILE.marks holding
# when the script wrote the change and saw the metric (the per-change timeline of BENCHMARKS.md).
#
# usage: sudo [CHANGES=N] scripts/bench-iptables-cpu.sh KPROXY INTEGRATION_TEST_BINARY SERVICES
set -u
export TZ=UTC  # the trigger times below are stamped by bash in UTC
kproxy=$1; fakeapi=$2; n=$3; endpoints=10
[ "$(id -u)" = 0 ] || { echo "bench-iptables-cpu.sh: needs root" >&2; exit 1; }
work=$(mktemp -d /tmp/kproxy-bench-cpu.XXXXXX)
ns=kpipt3api$$
tools=$work/tools; mkdir -p "$tools"
for t in iptables iptables-save ip6tables ip6tables-save ip6tables-restore; do ln -sf "$(command -v "${t/iptables/iptables-legacy}")" "$tools/$t"; done
# iptables-restore through a wrapper that splits each run's wall time with the child's
# /proc/PID/schedstat, read every 10 ms until it exits: on a CPU, waiting for one (the machine's
# load), and the rest, blocked (a lock, the kernel sleeping). One line per run in restores.txt:
# "start end run_ns runqueue_ns". Builtins only (the sleep is a read with a timeout); the
# wrapper's own CPU, about 0.02 s a run, counts in the tools' CPU.
restore_log=$work/restores.txt
cat > "$tools/iptables-restore" <<WRAPPER
#!/bin/bash
exec 9<> <(:)
start=\$EPOCHREALTIME
exec 8<&0
$(command -v iptables-legacy-restore) "\$@" <&8 & child=\$!
run=0 queued=0
while { read -r r q _ < /proc/\$child/schedstat; } 2>/dev/null; do run=\$r queued=\$q; read -t 0.01 -u 9 || :; done
wait \$child; rc=\$?
echo "\$start \$EPOCHREALTIME \$run \$queued" >> $restore_log
exit \$rc
WRAPPER
chmod +x "$tools/iptables-restore"
ip netns add "$ns"; ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" "$fakeapi" __fakeapi --listen 127.0.0.1:6443 --services "$n" --endpoints "$endpoints" --node bench-node > "$work/fakeapi.log" 2>&1 &
api_pid=$!
until grep -q '^fakeapi: serving' "$work/fakeapi.log"; do sleep 0.2; done
metric() { ip netns exec "$ns" curl -s --max-time 2 http://127.0.0.1:10249/metrics | awk -v n="$1" '$1 == n {print $2}'; }
start=$(date +%s.%N)
PATH="$tools:$PATH" ip netns exec "$ns" env "${KP_ENV:-KPROXY_BENCH=1}" "$kproxy" --master http://127.0.0.1:6443 --hostname-override bench-node \
  --proxy-mode iptables --cluster-cidr 10.128.0.0/9 --sync-period 1h \
  --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > "$work/kproxy.log" 2>&1 &
pid=$!
hz=$(getconf CLK_TCK)
until [ "$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_count 2>/dev/null)" = 1 ]; do sleep 0.1; kill -0 $pid || exit 1; done
to_rules=$(echo "$(date +%s.%N) - $start" | bc)
read -r u s cu cs <<<"$(awk '{print $14, $15, $16, $17}' /proc/"$pid"/stat)"
full=$(metric kubeproxy_sync_full_proxy_rules_duration_seconds_sum)
sleep 10
steady=$(awk '/VmRSS/{print $2}' /proc/"$pid"/status); peak=$(awk '/VmHWM/{print $2}' /proc/"$pid"/status)
last=$((n - 1))
# One EndpointSlice change: the last Service's slice with endpoint 0 moved to 10.254.K.1 (a new
# KPROXY-SEP chain, one deleted, the Service's KPROXY-SVC chain rewritten). Waits until the
# network-programming metric shows it; prints "programmed_s wall_s kproxy_cpu_s tools_cpu_s
# tools_user_s tools_sys_s". The slice's last-change-trigger-time is stamped just before the
# PUT (bash's clock, no process started in between): the metric then measures the write to the
# kernel, not the script's own preparation (a python start and two metric reads, about 0.1 s).
change() {
  local k=$1 now b c u0 s0 cu0 cs0 u1 s1 cu1 cs1 t0 t1 e
  python3 - "$n" "$endpoints" "$k" > "$work/slice.json" <<'PY'
import sys, json
n, m, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
i = n - 1
addr = lambda j: f"10.254.{k % 250}.1" if j == 0 else f"10.255.{j}.{1 + j}"
print(json.dumps({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": f"svc-{i}-ep", "namespace": f"ns-{i % 10}", "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                 "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "@NOW@"}},
    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [{"addresses": [addr(j)], "conditions": {"ready": True}, "nodeName": "node-0"} for j in range(m)]}))
PY
  b=$(metric kubeproxy_network_programming_duration_seconds_sum); c=$(metric kubeproxy_network_programming_duration_seconds_count)
  read -r u0 s0 cu0 cs0 <<<"$(awk '{print $14, $15, $16, $17}' /proc/"$pid"/stat)"
  [ -z "${STRACE:-}" ] || [ "$k" != 0 ] || { strace -f --seccomp-bpf -tt -T -e trace=execve,recvfrom,setsockopt,getsockopt,flock,wait4,exit_group \
    -o "$STRACE" -p "$pid" 2>/dev/null & strace_pid=$!; sleep 1; }
  e=$EPOCHREALTIME; printf -v now '%(%Y-%m-%dT%H:%M:%S)T.%sZ' "${e%.*}" "${e#*.}"
  t0=$(date +%s.%N)
  [ -z "${STRACE:-}" ] || [ "$k" != 0 ] || echo "$t0 PUT" >> "$STRACE.marks"
  ip netns exec "$ns" curl -sf -o /dev/null -X PUT -H 'Content-Type: application/json' --data-binary @- \
    "http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/ns-$((last % 10))/endpointslices/svc-$last-ep" \
    < <(sed "s/@NOW@/$now/" "$work/slice.json")
  until [ "$(metric kubeproxy_network_programming_duration_seconds_count)" != "$c" ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  [ -z "${STRACE:-}" ] || [ "$k" != 0 ] || { echo "$t1 metric seen" >> "$STRACE.marks"; kill "$strace_pid"; wait "$strace_pid" 2>/dev/null; }
  read -r u1 s1 cu1 cs1 <<<"$(awk '{print $14, $15, $16, $17}' /proc/"$pid"/stat)"
  echo "$(echo "$(metric kubeproxy_network_programming_duration_seconds_sum) - $b" | bc) $(echo "$t1 - $t0" | bc)" \
    "$(echo "($u1+$s1-$u0-$s0)/$hz" | bc -l)" "$(echo "($cu1+$cs1-$cu0-$cs0)/$hz" | bc -l)" \
    "$(echo "($cu1-$cu0)/$hz" | bc -l)" "$(echo "($cs1-$cs0)/$hz" | bc -l)"
}
read -r prog _ kcpu tcpu _ _ <<<"$(change 0)"
PATH="$tools:$PATH" ip netns exec "$ns" iptables-save -t nat | grep -q '10.254.0.1:8080' || echo "CHANGE NOT IN KERNEL"
printf "legacy n=%s start_to_rules=%.2fs full_sync=%.3fs peak=%dMiB steady=%dMiB change=%.3fs | first sync CPU: kproxy %.2f s, tools %.2f s | change CPU: kproxy %.2f s, tools %.2f s | load %s\n" \
  "$n" "$to_rules" "$full" $((peak / 1024)) $((steady / 1024)) "$prog" "$(echo "($u+$s)/$hz" | bc -l)" \
  "$(echo "($cu+$cs)/$hz" | bc -l)" "$kcpu" "$tcpu" "$(cut -d' ' -f1 /proc/loadavg)"
# CHANGES=N: N more changes, one at a time (a pause between them so that no two share a
# sync), and the percentiles of each column (nearest rank: with 20 samples p99 is the worst).
if [ "${CHANGES:-0}" -gt 0 ]; then
  for k in $(seq 1 "$CHANGES"); do change "$k" >> "$work/changes.txt"; sleep "${CHANGE_PAUSE:-1.5}"; done
  PATH="$tools:$PATH" ip netns exec "$ns" iptables-save -t nat | grep -q "10.254.$((CHANGES % 250)).1:8080" || echo "LAST CHANGE NOT IN KERNEL"
  python3 - "$work/changes.txt" "$(cut -d' ' -f1 /proc/loadavg)" "$restore_log" "$CHANGES" <<'PY'
import sys, math
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
def pct(col, p):
    v = sorted(r[col] for r in rows)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]
names = ["trigger to kernel (metric)", "write to metric seen (wall)", "kproxy CPU", "tools CPU", "tools user", "tools sys"]
print(f"{len(rows)} changes, load {sys.argv[2]}: " + "; ".join(
    f"{name} p50 {pct(i, 50):.3f} / p99 {pct(i, 99):.3f} / max {max(r[i] for r in rows):.3f} s" for i, name in enumerate(names)))
# The iptables-restore run of each of those changes (the last N in the log): its wall time, on a
# CPU, waiting for one, and the rest (blocked).
runs = [list(map(float, l.split())) for l in open(sys.argv[3]) if l.strip()][-int(sys.argv[4]):]
rows = [[e - s, r / 1e9, q / 1e9, (e - s) - r / 1e9 - q / 1e9] for s, e, r, q in runs]
names = ["wall", "on a CPU", "waiting for a CPU", "blocked"]
print(f"iptables-restore of each change ({len(rows)}): " + "; ".join(
    f"{name} p50 {pct(i, 50):.3f} / p99 {pct(i, 99):.3f} / max {max(r[i] for r in rows):.3f} s" for i, name in enumerate(names)))
PY
fi
echo "syncs failed: $(grep -c "sync failed" "$work/kproxy.log")"
[ -z "${KPROXY_LOG:-}" ] || cp "$work/kproxy.log" "$KPROXY_LOG"
kill "$pid"; wait "$pid" 2>/dev/null; kill "$api_pid"; wait "$api_pid" 2>/dev/null; ip netns del "$ns"; rm -rf "$work"
