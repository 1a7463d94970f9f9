#!/usr/bin/env bash
# Fetches Debian 13 (trixie)'s nft 1.1.3 without touching the host's packages: a separate apt
# configuration under target/nft-trixie, `apt-get download` of nftables, its libraries and
# trixie's libc, unpacked with dpkg-deb -x, and a wrapper that runs nft through trixie's own
# dynamic loader. Prints the wrapper's path. Idempotent: an existing unpacked tree is reused.
#
# usage: scripts/nft-trixie.sh            -> target/nft-trixie/nft (run it like nft)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$here/target/nft-trixie
wrapper=$root/nft
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi
mkdir -p "$root/apt/lists/partial" "$root/apt/cache/archives/partial" "$root/debs" "$root/tree"
cat > "$root/apt/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
apt_opts=(
  -o "Dir::Etc::SourceList=$root/apt/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$root/apt/lists"
  -o "Dir::Cache=$root/apt/cache"
  -o "Dir::State::Status=/dev/null"
  -o "APT::Architecture=amd64"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -q update >&2
cd "$root/debs"
# nft and every library it loads (ldd of trixie's nft), with trixie's libc for its loader.
apt-get "${apt_opts[@]}" -q download nftables libnftables1 libnftnl11 libmnl0 libjansson4 libgmp10 \
  libxtables12 libedit2 libbsd0 libmd0 libtinfo6 libc6 >&2
for deb in "$root"/debs/*.deb; do
  dpkg-deb -x "$deb" "$root/tree"
done
lib=$root/tree/usr/lib/x86_64-linux-gnu:$root/tree/lib/x86_64-linux-gnu
loader=
for l in "$root"/tree/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root"/tree/lib64/ld-linux-x86-64.so.2; do
  if [ -e "$l" ]; then loader=$l; break; fi
done
[ -n "$loader" ] || { echo "nft-trixie.sh: no ld-linux-x86-64.so.2 in trixie's libc6" >&2; exit 1; }
cat > "$wrapper" <<WRAP
#!/bin/sh
exec "$loader" --library-path "$lib" "$root/tree/usr/sbin/nft" "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
