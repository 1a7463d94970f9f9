#!/usr/bin/env bash
# Benchmark (not a test) of the embedded Ingress proxy against nginx for the same route, in
# four shapes: small answers over keep-alive connections, a new connection per request, 1 MiB
# answers, and HTTPS with keep-alive. For each shape and run, kproxy and nginx are measured
# back to back (interleaved, so both see the same machine load): requests/s, p50 and p99 (wrk
# --latency), CPU time of the proxy process per request (/proc/PID/stat before and after,
# divided by the requests wrk counted), errors, and the reuse rate of backend connections
# (1 - connections the backend accepted / requests it served, from its stub_status).
#
# Everything runs in a throwaway network namespace on loopback: the backend is nginx (one
# worker) answering a fixed body on / and a 1 MiB file on /big; nginx as the proxy has as many
# worker processes as kproxy has worker threads (one per CPU the proxies are pinned to), with what ingress-nginx sets for such a route
# (reuseport listeners, upstream keep-alive, the forwarding headers, proxy_buffering off) and
# 16 KiB proxy buffers (kproxy reads 16 KiB at a time).
#
# usage: sudo benches/ingress.sh [DURATION_SECONDS] [RUNS] [SHAPES]
#          SHAPES: any of "keepalive newconn 1mib https" (default: all four)
#        BENCH_PERF=FILE sudo benches/ingress.sh [DURATION]   records perf profiles of kproxy
#          (FILE) and nginx's workers (FILE.nginx) under the keep-alive shape (SHAPES "newconn": a
#          new connection per request; "1mib": 1 MiB answers) instead (perf report -i FILE);
#          BENCH_PERF_WHO=load records the load's CPUs (wrk, the backend, the kernel) instead;
#          BENCH_PERF_EVENTS="-e EVENT ..." samples those events instead of the CPU clock
#        BENCH_COUNT=1|DIR sudo benches/ingress.sh [DURATION]   counts instead of timing: user-space
#          instructions per request (valgrind's callgrind) and system calls per request (strace
#          -c) of kproxy and nginx, keep-alive shape; deterministic, unlike times on a shared machine
#          (with a directory, the callgrind files are kept there for callgrind_annotate); with
#          SHAPES "newconn", a new connection per request; "https", HTTPS with keep-alive;
#          BENCH_COUNT_VALGRIND="--cache-sim=yes ..." adds callgrind's options (cache misses),
#          BENCH_COUNT_CONNECTIONS=N wrk's connections (8 by default)
#        BENCH_SYSCALLS=1 sudo benches/ingress.sh [DURATION] [RUNS] [SHAPES]   counts per request
#          under the real load (wrk -c64, no tracer slowing the proxy down): system calls by
#          kind, reads that found nothing (EAGAIN), epoll_wait calls and the events they
#          returned, context switches and CPU migrations, from the kernel's tracepoints and
#          software counters (perf stat), and TCP segments sent in the namespace per request
#          (nstat: every hop, client, proxy and backend), kproxy and nginx interleaved;
#          keep-alive by default
#        BENCH_WRITE=0 ...   print the results without rewriting BENCHMARKS.md and the plots
#        KPROXY_BIN=PATH ...   measure that binary instead of building target/release/kproxy
#        BENCH_PROXY_CPUS=LIST BENCH_LOAD_CPUS=LIST ...   CPUs (taskset lists) for the proxy
#          under test and for wrk and the backend; default the last CPU for the proxies and the
#          others for the load, so that the proxy never competes with its own load generator
#          (BENCH_PIN=0: no pinning, every process on every CPU)
# needs: wrk, nginx (nginx-light), curl, openssl, iproute2; python3 with matplotlib for the
# plots (installed with pip if missing).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
duration=${1:-10}
runs=${2:-3}
shapes=${3:-"keepalive newconn 1mib https"}
connections=64
cpus=$(nproc)
if [ "${BENCH_PIN:-1}" = 1 ] && [ "$cpus" -ge 2 ]; then
  proxy_cpus=${BENCH_PROXY_CPUS:-$((cpus - 1))}
  load_cpus=${BENCH_LOAD_CPUS:-$([ "$cpus" = 2 ] && echo 0 || echo "0-$((cpus - 2))")}
else
  proxy_cpus=0-$((cpus - 1))
  load_cpus=$proxy_cpus
fi
# kproxy starts one worker per CPU it may run on; nginx gets as many.
workers=$(taskset -c "$proxy_cpus" nproc)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$(id -u)" = 0 ] || { echo "ingress.sh: needs root (network namespace)" >&2; exit 1; }
for tool in wrk nginx curl ip openssl taskset; do
  command -v "$tool" >/dev/null || { echo "ingress.sh: missing $tool (apt-get install wrk nginx-light curl iproute2 openssl)" >&2; exit 1; }
done

ns_prefix=kpbench
# shellcheck source=benches/ingress-common.sh
. "$here/benches/ingress-common.sh"

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=myapp.example.com \
  -addext subjectAltName=DNS:myapp.example.com \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
head -c 1048576 /dev/urandom >"$work/big"
chmod 644 "$work/big"

cat >"$work/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:8081 backlog=4096;
    location / { return 200 "hello from the backend\n"; }
    location = /big { alias $work/big; }
  }
  server {
    listen 127.0.0.1:8090;
    location / { stub_status; }
  }
}
CONF
cat >"$work/proxy.conf" <<CONF
worker_processes $workers;
daemon off;
pid $work/proxy.pid;
error_log $work/proxy.err;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream myapp { server 127.0.0.1:8081; keepalive 320; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:8082 reuseport backlog=4096;
    listen 127.0.0.1:8442 ssl reuseport backlog=4096;
    ssl_certificate $work/tls.crt;
    ssl_certificate_key $work/tls.key;
    location / {
      proxy_pass http://myapp;
      proxy_http_version 1.1;
      proxy_buffering off;
      proxy_buffer_size 16k;
      proxy_buffers 8 16k;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
CONF
write_manifests

in_ns taskset -c "$load_cpus" nginx -c "$work/backend.conf" & pids+=($!)
in_ns taskset -c "$proxy_cpus" nginx -c "$work/proxy.conf" & pids+=($!)
start_kproxy taskset -c "$proxy_cpus"
wait_for http://127.0.0.1:8081/ http://127.0.0.1:8082/ http://127.0.0.1:8083/ \
  https://myapp.example.com:8442/ https://myapp.example.com:8443/
nginx_master=$(pgrep -f "nginx -c $work/proxy.conf" | head -1)
mapfile -t nginx_pids < <(echo "$nginx_master"; pgrep -P "$nginx_master")

if [ -n "${BENCH_PERF:-}" ]; then
  # kproxy into FILE, then nginx's workers into FILE.nginx, each under the same load.
  record_one() { # output, url, pids
    local who=(-p "$3")
    # The load's CPUs instead: what wrk, the backend and the kernel spend for each proxy.
    [ "${BENCH_PERF_WHO:-proxy}" = load ] && who=(-a -C "$load_cpus")
    # shellcheck disable=SC2086 # BENCH_PERF_EVENTS: perf record's own options, word-split.
    perf record ${BENCH_PERF_EVENTS:--F 999} -g "${who[@]}" -o "$1" -- sleep "$duration" >/dev/null 2>&1 &
    local perf_pid=$!
    local args=(-t2 -c"$connections" -d"${duration}s" -H "Host: myapp.example.com") path=/
    case $shapes in
      newconn) args+=(-H "Connection: close") ;;
      1mib) args=(-t2 -c16 -d"${duration}s" -H "Host: myapp.example.com") path=/big ;;
    esac
    in_ns taskset -c "$load_cpus" wrk "${args[@]}" "$2${path#/}" >/dev/null
    # Only perf: a bare `wait` would also wait for the servers started above.
    wait "$perf_pid"
  }
  record_one "$BENCH_PERF" http://127.0.0.1:8083/ "$kproxy_pid"
  record_one "$BENCH_PERF.nginx" http://127.0.0.1:8082/ "$(pgrep -P "$nginx_master" | tr '\n' ',' | sed 's/,$//')"
  echo "profiles in $BENCH_PERF (kproxy) and $BENCH_PERF.nginx"
  exit 0
fi

if [ -n "${BENCH_SYSCALLS:-}" ]; then
  # Counted by the kernel (tracepoints and software counters), so the proxy runs at full speed:
  # strace stops it at every call, which batches readiness events and hides what waits.
  events=raw_syscalls:sys_enter,context-switches,cpu-migrations,page-faults,task-clock
  for call in epoll_wait epoll_pwait recvfrom read readv sendto write writev sendmsg splice futex epoll_ctl accept4 close getsockopt setsockopt; do
    [ -d "/sys/kernel/tracing/events/syscalls/sys_enter_$call" ] && events+=,syscalls:sys_enter_$call
  done
  [ "$shapes" = "keepalive newconn 1mib https" ] && shapes=keepalive
  echo "| shape | proxy | run | requests | CPU µs/request | system calls | epoll_wait | recvfrom | of them EAGAIN | sendto | writev, sendmsg | write | splice | futex | epoll_ctl | context switches | migrations | page faults | TCP segments |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  # nstat's history file of its own: the default one is per user, shared with other runs.
  export NSTAT_HISTORY=$work/nstat.history
  count_calls() { # shape, name, run, url, pids (comma-separated)
    local shape=$1 name=$2 run=$3 url=$4 target=$5 out=$work/perf.$2 args=(-t2 -c"$connections" -d"${duration}s" -H "Host: myapp.example.com")
    [ "$shape" = newconn ] && args+=(-H "Connection: close")
    [ "$shape" = 1mib ] && args=(-t2 -c16 -d"${duration}s" -H "Host: myapp.example.com")
    # recvfrom's exit carries its result: -11 is EAGAIN, a read that found nothing.
    perf stat -x, -o "$out" -e "$events" -e syscalls:sys_exit_recvfrom --filter 'ret == -11' -p "$target" &
    local perf_pid=$! wrk_out
    sleep 0.5
    in_ns nstat -n
    wrk_out=$(in_ns taskset -c "$load_cpus" wrk "${args[@]}" "$url")
    local segments
    segments=$(in_ns nstat -z TcpOutSegs | awk '$1 == "TcpOutSegs" {print $2}')
    kill -INT "$perf_pid"
    wait "$perf_pid" 2>/dev/null || true
    local requests
    requests=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
    awk -F, -v shape="$shape" -v name="$name" -v run="$run" -v n="$requests" -v segs="${segments:-0}" '
      $3 != "" { c[$3] = $1 + 0 }
      END {
        printf "| %s | %s | %s | %d | %.1f | %.2f | %.3f | %.2f | %.3f | %.2f | %.2f | %.2f | %.2f | %.3f | %.3f | %.3f | %.4f | %.4f | %.2f |\n", shape, name, run, n,
          c["task-clock"] * 1000 / n, c["raw_syscalls:sys_enter"] / n, (c["syscalls:sys_enter_epoll_wait"] + c["syscalls:sys_enter_epoll_pwait"]) / n,
          (c["syscalls:sys_enter_recvfrom"] + c["syscalls:sys_enter_read"]) / n, c["syscalls:sys_exit_recvfrom"] / n,
          c["syscalls:sys_enter_sendto"] / n, (c["syscalls:sys_enter_writev"] + c["syscalls:sys_enter_sendmsg"]) / n, c["syscalls:sys_enter_write"] / n,
          c["syscalls:sys_enter_splice"] / n, c["syscalls:sys_enter_futex"] / n, c["syscalls:sys_enter_epoll_ctl"] / n, c["context-switches"] / n, c["cpu-migrations"] / n, c["page-faults"] / n, segs / n
      }' "$out"
  }
  for run in $(seq 1 "$runs"); do
    for shape in $shapes; do
      k=http://127.0.0.1:8083/ n=http://127.0.0.1:8082/
      [ "$shape" = https ] && k=https://myapp.example.com:8443/ n=https://myapp.example.com:8442/
      [ "$shape" = 1mib ] && k=http://127.0.0.1:8083/big n=http://127.0.0.1:8082/big
      nginx_workers=$(pgrep -P "$nginx_master" | tr '\n' ',' | sed 's/,$//')
      if [ $((run % 2)) = 1 ]; then
        count_calls "$shape" kproxy "$run" "$k" "$kproxy_pid"
        count_calls "$shape" nginx "$run" "$n" "$nginx_workers"
      else
        count_calls "$shape" nginx "$run" "$n" "$nginx_workers"
        count_calls "$shape" kproxy "$run" "$k" "$kproxy_pid"
      fi
    done
  done
  exit 0
fi

if [ -n "${BENCH_COUNT:-}" ]; then
  # Second instances on their own ports: kproxy under callgrind, and nginx with one process.
  sed -e "s/^worker_processes .*/worker_processes 1;\nmaster_process off;/" -e "s/8082 reuseport/8092 reuseport/" \
    -e "s/8442 ssl reuseport/8452 ssl reuseport/" -e "s|pid $work/proxy.pid|pid $work/proxy2.pid|" "$work/proxy.conf" >"$work/proxy2.conf"
  count_one() { # name, url, command...
    local name=$1 url=$2
    shift 2
    local out="$work/cg.$name"
    # shellcheck disable=SC2086 # BENCH_COUNT_VALGRIND: valgrind's own options, word-split.
    in_ns taskset -c "$proxy_cpus" valgrind --tool=callgrind --instr-atstart=no ${BENCH_COUNT_VALGRIND:-} --callgrind-out-file="$out" "$@" >/dev/null 2>"$work/cg.$name.log" &
    pids+=($!)
    for _ in $(seq 1 300); do
      in_ns curl -skf -H "Host: myapp.example.com" "$url" >/dev/null && break
      sleep 0.2
    done
    local pid
    pid=$(pgrep -f "callgrind-out-file=$out" | tail -1)
    callgrind_control -i on "$pid" >/dev/null 2>&1
    local wrk_out requests
    wrk_out=$(in_ns taskset -c "$load_cpus" wrk -t1 -c"$count_conns" -d"${duration}s" -H "Host: myapp.example.com" "${count_extra[@]}" "$url")
    requests=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
    callgrind_control -d "$pid" >/dev/null 2>&1
    if [ -d "${BENCH_COUNT}" ]; then cp "$out".* "$BENCH_COUNT/"; fi
    sleep 1
    local ir
    ir=$(cat "$out".[0-9]* 2>/dev/null | awk '/^totals:/ {s += $2} END {print s + 0}')
    kill "$pid" 2>/dev/null || true
    # System calls per request, at full speed.
    local target_pid
    case $name in
      kproxy) target_pid=$kproxy_pid ;;
      nginx) target_pid=$(pgrep -P "$nginx_master" | tr '\n' ',' | sed 's/,$//') ;;
    esac
    local port_url
    case $name in kproxy) port_url=$kproxy_url ;; nginx) port_url=$nginx_url ;; esac
    strace -c -f -qq -o "$work/strace.$name" -p "$target_pid" &
    local strace_pid=$!
    sleep 0.5
    wrk_out=$(in_ns taskset -c "$load_cpus" wrk -t1 -c"$count_conns" -d"${duration}s" -H "Host: myapp.example.com" "${count_extra[@]}" "$port_url")
    kill -INT "$strace_pid"
    wait "$strace_pid" 2>/dev/null || true
    local sreq calls
    sreq=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
    calls=$(awk '$NF == "total" {print $(NF-2)}' "$work/strace.$name")
    awk -v n="$name" -v ir="$ir" -v r="$requests" -v c="$calls" -v s="$sreq" \
      'BEGIN { printf "| %s | %d | %.0f | %d | %.2f |\n", n, r, ir / r, s, c / s }'
    echo "system calls of $name (strace -c):" >&2
    cat "$work/strace.$name" >&2
  }
  count_conns=${BENCH_COUNT_CONNECTIONS:-8}
  # The shape: keepalive (default), or newconn or https with the third argument.
  count_extra=(-H "X-Shape: keepalive")
  kproxy_url=http://127.0.0.1:8083/ nginx_url=http://127.0.0.1:8082/
  kproxy_url2=http://127.0.0.1:8093/ nginx_url2=http://127.0.0.1:8092/
  case $shapes in
    newconn) count_extra=(-H "Connection: close") ;;
    https)
      kproxy_url=https://myapp.example.com:8443/ nginx_url=https://myapp.example.com:8442/
      kproxy_url2=https://myapp.example.com:8453/ nginx_url2=https://myapp.example.com:8452/
      ;;
  esac
  echo "| proxy | requests under callgrind | user-space instructions per request | requests under strace | system calls per request |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  count_one kproxy "$kproxy_url2" "$kproxy" --manifests "$work/manifests" --hostname-override bench-node \
    --healthz-bind-address "" --metrics-bind-address "" \
    --ingress-http-bind-address 127.0.0.1:8093 --ingress-https-bind-address 127.0.0.1:8453
  count_one nginx "$nginx_url2" nginx -c "$work/proxy2.conf"
  exit 0
fi

# CPU ticks (user + system) of the given processes, all their threads.
ticks() {
  local total=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)
# "accepts requests" of the backend so far.
backend_counts() { in_ns curl -s http://127.0.0.1:8090/ | awk 'NR == 3 {print $1, $3}'; }
# wrk's latency figures (us, ms or s) in milliseconds.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

results=$work/results.tsv
echo -e "shape\tproxy\trun\trps\tp50_ms\tp99_ms\tcpu_us_per_req\treuse\terrors\tload1" >"$results"
# One measurement: shape, proxy name, run number, URL, the proxy's pids.
measure() {
  local shape=$1 name=$2 run=$3 url=$4
  shift 4
  local args=(-t2 -c"$connections" -d"${duration}s" --latency -H "Host: myapp.example.com")
  case $shape in
    newconn) args+=(-H "Connection: close") ;;
    1mib) args=(-t2 -c16 -d"${duration}s" --latency -H "Host: myapp.example.com") ;;
  esac
  local before after b0 b1 out load1
  load1=$(cut -d' ' -f1 /proc/loadavg)
  read -r -a b0 < <(backend_counts)
  before=$(ticks "$@")
  out=$(in_ns taskset -c "$load_cpus" wrk "${args[@]}" "$url")
  after=$(ticks "$@")
  read -r -a b1 < <(backend_counts)
  echo "== $shape $name run $run: wrk ${args[*]} $url" >>"$work/wrk.txt"
  echo "$out" >>"$work/wrk.txt"
  local requests rps p50 p99 errors cpu reuse
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/^Requests\/sec:/ {printf "%d", $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  errors=$(awk '/Socket errors/ {gsub(",", ""); s += $4 + $6 + $8 + $10} /Non-2xx/ {s += $NF} END {print s + 0}' <<<"$out")
  cpu=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.1f", (n > 0 ? t / hz / n * 1e6 : 0) }')
  reuse=$(awk -v a=$((b1[0] - b0[0])) -v r=$((b1[1] - b0[1])) 'BEGIN { printf "%.4f", (r > 0 ? 1 - a / r : 0) }')
  echo -e "$shape\t$name\t$run\t$rps\t$p50\t$p99\t$cpu\t$reuse\t$errors\t$load1" >>"$results"
  echo "$shape $name run $run: $rps req/s, p50 $p50 ms, p99 $p99 ms, $cpu us CPU/request, backend reuse $reuse, errors $errors, load $load1" >&2
}

nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///')
for run in $(seq 1 "$runs"); do
  for shape in $shapes; do
    case $shape in
      keepalive | newconn) k=http://127.0.0.1:8083/ n=http://127.0.0.1:8082/ ;;
      1mib) k=http://127.0.0.1:8083/big n=http://127.0.0.1:8082/big ;;
      https) k=https://myapp.example.com:8443/ n=https://myapp.example.com:8442/ ;;
      *) echo "unknown shape $shape" >&2; exit 1 ;;
    esac
    # Alternate which goes first, so neither always runs on a machine warmed by the other.
    if [ $((run % 2)) = 1 ]; then
      measure "$shape" kproxy "$run" "$k" "$kproxy_pid"
      measure "$shape" "nginx" "$run" "$n" "${nginx_pids[@]}"
    else
      measure "$shape" "nginx" "$run" "$n" "${nginx_pids[@]}"
      measure "$shape" kproxy "$run" "$k" "$kproxy_pid"
    fi
  done
done
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$kproxy_pid/status")

table=$work/table.md
{
  echo "Written by \`benches/ingress.sh $duration $runs\` on $(date -u +%Y-%m-%d) ($(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)); nginx $nginx_version with $workers worker process(es), kproxy with $workers worker thread(s); wrk -t2 -c$connections (-c16 for 1 MiB) for ${duration} s per measurement; $(if [ "$proxy_cpus" = "$load_cpus" ]; then echo "wrk, the backend and the proxy share the CPUs"; else echo "the proxy under test pinned to CPU $proxy_cpus, wrk and the backend to CPU $load_cpus (taskset)"; fi). One row per run, kproxy and nginx measured back to back; the last column is the 1-minute load average when the measurement began."
  echo
  echo "| shape | proxy | run | requests/s | p50 ms | p99 ms | CPU µs/request | backend reuse | errors | load |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  tail -n +2 "$results" | sort -s -k1,1 -k2,2 | awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %.2f %% | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 * 100, $9, $10}'
  echo
  echo "Medians over the runs (kproxy / nginx):"
  echo
  echo "| shape | requests/s | p50 ms | p99 ms | CPU µs/request |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  for shape in $shapes; do
    med() { awk -F'\t' -v s="$shape" -v p="$1" -v c="$2" '$1 == s && $2 == p {print $c}' "$results" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
    echo "| $shape | $(med kproxy 4) / $(med nginx 4) ($(awk -v a="$(med kproxy 4)" -v b="$(med nginx 4)" 'BEGIN {printf "%.2f×", a / b}')) | $(med kproxy 5) / $(med nginx 5) | $(med kproxy 6) / $(med nginx 6) | $(med kproxy 7) / $(med nginx 7) |"
  done
  echo
  echo "kproxy peak RSS over the whole benchmark: $((rss_kib / 1024)) MiB. Plots: benches/ingress-*.png."
} >"$table"
cat "$table"

if [ "${BENCH_WRITE:-1}" = 1 ]; then
  cp "$results" "$here/benches/ingress-results.tsv"
  python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
  python3 - "$results" "$here/benches" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
titles = {"keepalive": "small answers, keep-alive", "newconn": "new connection per request",
          "1mib": "1 MiB answers, keep-alive", "https": "HTTPS, keep-alive"}
for shape in dict.fromkeys(r["shape"] for r in rows):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (col, label) in zip(axes, [("rps", "requests/s"), ("p99_ms", "p99 latency (ms)"), ("cpu_us_per_req", "proxy CPU per request (µs)")]):
        for i, proxy in enumerate(["kproxy", "nginx"]):
            vals = [float(r[col]) for r in rows if r["shape"] == shape and r["proxy"] == proxy]
            ax.bar([i + 0.8 * (j - (len(vals) - 1) / 2) / max(len(vals), 1) for j in range(len(vals))],
                   vals, width=0.8 / max(len(vals), 1), color=["tab:blue", "tab:green"][i])
        ax.set_xticks([0, 1], ["kproxy", "nginx"])
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"{titles.get(shape, shape)} (one bar per run)")
    fig.tight_layout()
    fig.savefig(f"{sys.argv[2]}/ingress-{shape}.png", dpi=90)
PY
  python3 - "$here/BENCHMARKS.md" "$table" <<'PY'
import sys
path, table = sys.argv[1], open(sys.argv[2]).read()
text = open(path).read()
begin, end = "<!-- benches/ingress.sh: begin -->", "<!-- benches/ingress.sh: end -->"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + begin + "\n" + table + end + rest.split(end, 1)[1]
else:
    text += "\n" + begin + "\n" + table + end + "\n"
open(path, "w").write(text)
PY
  echo "BENCHMARKS.md and benches/ingress-*.png updated" >&2
fi
