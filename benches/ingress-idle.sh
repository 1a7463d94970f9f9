#!/usr/bin/env bash
# Benchmark (not a test): what an idle client connection costs the Ingress proxy. Opens N
# connections (default 10,000) to kproxy, sends one request on each and reads the answer,
# leaves them idle (HTTP/1.1 keep-alive), and reads the proxy's resident memory before and
# after: (RSS after - RSS before) / N. Then the same over HTTPS (TLS 1.3, HTTP/1.1) and over
# cleartext HTTP/2 (prior knowledge, one request on stream 1, then idle), and all three again
# for nginx (sum of its processes' RSS). Runs in a throwaway network namespace.
#
# usage: sudo benches/ingress-idle.sh [CONNECTIONS]   (needs nginx, python3, openssl, curl)
#        KPROXY_BIN=PATH ...   measure that binary instead of building target/release/kproxy
#        IDLE_MODES="plain tls h2" ...   which kinds of connection, in which order
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10000}
[ "$(id -u)" = 0 ] || { echo "ingress-idle.sh: needs root (network namespace)" >&2; exit 1; }
# Each side holds N descriptors; raise the soft limit as far as the hard one allows.
want=$((n + 2048))
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] || [ "$hard" -ge "$want" ] || { echo "ingress-idle.sh: open files hard limit $hard < $want" >&2; exit 1; }
ulimit -n "$want"

ns_prefix=kpidle
# shellcheck source=benches/ingress-common.sh
. "$here/benches/ingress-common.sh"
# Enough local ports and backlog for N connections on loopback.
in_ns sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.core.somaxconn=65535

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=myapp.example.com \
  -addext subjectAltName=DNS:myapp.example.com -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null

cat >"$work/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:8081; location / { return 200 "hello from the backend\n"; } }
}
CONF
cat >"$work/proxy.conf" <<CONF
worker_processes $(nproc);
worker_rlimit_nofile $want;
daemon off;
pid $work/proxy.pid;
error_log $work/proxy.err;
events { worker_connections $want; }
http {
  access_log off;
  keepalive_timeout 300s;
  upstream myapp { server 127.0.0.1:8081; keepalive 64; }
  server {
    listen 127.0.0.1:8082 reuseport backlog=65535;
    listen 127.0.0.1:8442 ssl reuseport backlog=65535;
    listen 127.0.0.1:8084 http2 reuseport backlog=65535;
    ssl_certificate $work/tls.crt;
    ssl_certificate_key $work/tls.key;
    location / {
      proxy_pass http://myapp;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
}
CONF
write_manifests

in_ns nginx -c "$work/backend.conf" & pids+=($!)
in_ns nginx -c "$work/proxy.conf" & pids+=($!)
start_kproxy
wait_for http://127.0.0.1:8082/ http://127.0.0.1:8083/ https://myapp.example.com:8442/ https://myapp.example.com:8443/
nginx_master=$(pgrep -f "nginx -c $work/proxy.conf" | head -1)

# Resident KiB of the given processes.
rss() {
  local total=0 p
  for p in "$@"; do
    total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$total"
}

cat >"$work/idle.py" <<'PY'
# Opens N connections, one request each, then holds them idle until stdin closes.
import asyncio, ssl, struct, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tls = mode == "tls"
ctx = None
if tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
REQ = b"GET / HTTP/1.1\r\nHost: myapp.example.com\r\n\r\n"
def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
# HTTP/2 with prior knowledge: the preface, empty SETTINGS, and GET / on stream 1 (HPACK:
# :method GET, :scheme http, :path / from the static table, :authority as a literal).
AUTHORITY = b"myapp.example.com"
H2_REQ = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
          + frame(1, 0x5, 1, b"\x82\x86\x84\x41" + bytes([len(AUTHORITY)]) + AUTHORITY))
async def one_h2():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(H2_REQ)
    while True:
        head = await r.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
        await r.readexactly(length)
        if kind == 4 and not flags & 1:
            w.write(frame(4, 1, 0))  # SETTINGS ACK
        if kind == 7:
            raise RuntimeError("GOAWAY")
        if stream == 1 and kind in (0, 1) and flags & 1:
            await w.drain()
            return w
async def one(sem):
    async with sem:
        if mode == "h2":
            return await one_h2()
        r, w = await asyncio.open_connection("myapp.example.com" if tls else "127.0.0.1", port,
                                             ssl=ctx, server_hostname="myapp.example.com" if tls else None)
        w.write(REQ)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
        await r.readexactly(length)
        return w
async def main():
    sem = asyncio.Semaphore(200)
    conns = await asyncio.gather(*(one(sem) for _ in range(n)))
    print(len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY

# One measurement: proxy name, port, tls|plain, pids.
measure() {
  local name=$1 port=$2 mode=$3
  shift 3
  sleep 1
  local before after opened
  before=$(rss "$@")
  coproc CLIENT { in_ns python3 "$work/idle.py" "$port" "$n" "$mode"; }
  read -r opened <&"${CLIENT[0]}"
  sleep 2
  after=$(rss "$@")
  # Closing the client's stdin makes it close its connections and exit.
  local to_client=${CLIENT[1]}
  exec {to_client}>&-
  wait "$CLIENT_PID" 2>/dev/null || true
  awk -v name="$name" -v mode="$mode" -v o="$opened" -v b="$before" -v a="$after" \
    'BEGIN { printf "| %s | %s | %d | %.1f | %.1f | %.2f |\n", name, mode == "tls" ? "HTTPS (TLS 1.3)" : mode == "h2" ? "HTTP/2 (cleartext)" : "HTTP/1.1", o, b / 1024, a / 1024, (a - b) / o }'
  sleep 1
}

echo "Written by \`benches/ingress-idle.sh $n\` on $(date -u +%Y-%m-%d) ($(nproc) CPUs). Each connection served one request and then stayed open, idle."
echo
echo "| proxy | connections | opened | RSS before, MiB | RSS with them open, MiB | KiB per idle connection |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
# Kinds of connection measured, in this order (IDLE_MODES="tls" for one alone: memory the
# earlier kinds' connections gave back may be reused by the later ones).
modes=${IDLE_MODES:-plain tls h2}
nginx_name="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')"
for mode in $modes; do
  case $mode in
    plain) measure kproxy 8083 plain "$kproxy_pid" ;;
    tls) measure kproxy 8443 tls "$kproxy_pid" ;;
    h2) measure kproxy 8083 h2 "$kproxy_pid" ;;
  esac
done
for mode in $modes; do
  case $mode in
    plain) measure "$nginx_name" 8082 plain $(pgrep -P "$nginx_master") "$nginx_master" ;;
    tls) measure "$nginx_name" 8442 tls $(pgrep -P "$nginx_master") "$nginx_master" ;;
    h2) measure "$nginx_name" 8084 h2 $(pgrep -P "$nginx_master") "$nginx_master" ;;
  esac
done
