#!/usr/bin/env bash
# Runs the IPVS integration scenarios with real packets inside a throw-away qemu guest that boots
# Debian's own kernel (this host's kernel may lack IPVS and dummy interfaces).
#
#   scripts/ipvs-vm.sh                 # all ipvs:: scenarios; exit code = the tests' exit code
#   scripts/ipvs-vm.sh -- ipvs::api::   # any libtest arguments after --, instead of "ipvs::"
#
# Steps: apt packages (qemu, busybox-static, kmod, cpio, and the tools copied into the guest),
# the linux-image-amd64 kernel package unpacked (not installed) under target/ipvs-vm/, the
# kproxy and integration test binaries built, an initramfs with busybox, iproute2's ip, nft,
# curl, ipvsadm (only the tests use it, to check kproxy's work and add a foreign service),
# iptables-nft (for the default-mode --cleanup), their libraries and the kernel modules; then a
# software-emulated (TCG) boot that runs the tests as PID 1's child and powers off.
#
# KPROXY_VM_RUN='shell command' runs that in the guest instead of the tests (with strace, perf and
# ipvsadm at hand): e.g. to capture what ipvsadm sends, for the netlink encoding's unit tests.
# Environment: KPROXY_VM_TIMEOUT (seconds for the whole boot, default 1500), KPROXY_VM_ACCEL
# (tcg by default; kvm only on a host with real hardware virtualisation), KPROXY_VM_SMP (2),
# KPROXY_VM_NO_APT=1 to skip apt when the tools are installed, KPROXY_VM_RELEASE=1 for release
# builds of both binaries (benchmarks: scripts/bench-ipvs-vm.sh), KPROXY_VM_TESTBIN=PATH an
# integration test binary already built (then only kproxy is built), KPROXY_VM_KPROXY=PATH a
# kproxy binary already built, KPROXY_VM_EXTRA_BINS="NAME=PATH ..." more binaries for /test
# (e.g. another commit's kproxy, for a before/after benchmark in one boot).
# Exit codes: the tests' code; 90 when the guest gives no result (crash or timeout); 2 on setup errors.
set -euo pipefail

# Everything runs from main, so bash has read the whole file before it starts (editing a
# running script then cannot change what it does).
main() {
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/ipvs-vm
TIMEOUT=${KPROXY_VM_TIMEOUT:-1500}
ACCEL=${KPROXY_VM_ACCEL:-tcg}
SMP=${KPROXY_VM_SMP:-2}
TEST_ARGS=("ipvs::")
if [ "${1:-}" = "--" ]; then
  shift
  TEST_ARGS=("$@")
fi
START=$(date +%s)

step() { echo "==> $*" >&2; }
die() { echo "ipvs-vm: $*" >&2; exit 2; }

# Kernel modules the guest loads at boot (dependencies resolved by modprobe --show-depends);
# the rest of net/netfilter is in the image for the kernel's own module requests.
MODULES="ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_lc ip_vs_wlc ip_vs_mh dummy veth
  nf_conntrack nf_nat nf_tables nft_ct nft_chain_nat nft_nat nft_masq nft_reject
  nft_reject_ipv4 nft_reject_ipv6 nft_reject_inet nft_compat x_tables crc32c_generic"

# ---- 1. host packages ----
TOOLS="qemu-system-x86_64 busybox modprobe depmod cpio nft ip curl ipvsadm python3 xtables-nft-multi"
missing=""
for t in $TOOLS; do command -v "$t" >/dev/null 2>&1 || missing="$missing $t"; done
if [ -n "$missing" ] && [ "${KPROXY_VM_NO_APT:-}" != 1 ]; then
  step "installing packages (missing:$missing)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -o DPkg::Lock::Timeout=300
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
    qemu-system-x86 busybox-static kmod cpio gzip nftables iproute2 curl ipvsadm iptables python3 \
    binutils ca-certificates
fi
for t in $TOOLS; do command -v "$t" >/dev/null 2>&1 || die "$t is missing"; done

# ---- 2. Debian's kernel, unpacked into target/ipvs-vm/kroot (the host is left alone) ----
PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$PKG" ] || die "apt-cache knows no linux-image-amd64 (run apt-get update)"
KVER=${PKG#linux-image-}
KROOT=$WORK/kroot
if [ ! -e "$KROOT/boot/vmlinuz-$KVER" ]; then
  step "fetching $PKG"
  rm -rf "$WORK/debs" "$KROOT"
  mkdir -p "$WORK/debs" "$KROOT"
  (cd "$WORK/debs" && apt-get download "$PKG")
  dpkg-deb -x "$WORK"/debs/"$PKG"_*.deb "$KROOT"
fi
MODDIR=$KROOT/lib/modules/$KVER
[ -s "$MODDIR/modules.dep" ] || depmod -b "$KROOT" "$KVER"
# The uncompressed ELF inside vmlinuz boots directly (PVH), skipping the decompressor: seconds under TCG.
VMLINUX=$WORK/vmlinux-$KVER
if [ ! -s "$VMLINUX" ]; then
  python3 - "$KROOT/boot/vmlinuz-$KVER" "$VMLINUX" <<'PY'
import lzma, sys
d = open(sys.argv[1], 'rb').read()
i = d.find(b'\xfd7zXZ\x00')          # Debian's amd64 kernels are XZ-compressed
if i < 0: sys.exit("no XZ payload in " + sys.argv[1])
out = lzma.LZMADecompressor().decompress(d[i:])
if out[:4] != b'\x7fELF': sys.exit("the payload is not an ELF vmlinux")
open(sys.argv[2], 'wb').write(out)
PY
fi

# ---- 3. the binaries under test ----
step "building kproxy and the integration tests"
PROFILE=() BINDIR=debug
if [ -n "${KPROXY_VM_RELEASE:-}" ]; then PROFILE=(--release) BINDIR=release; fi
KPROXY=${KPROXY_VM_KPROXY:-$ROOT/target/$BINDIR/kproxy}
[ -n "${KPROXY_VM_KPROXY:-}" ] || cargo build --locked "${PROFILE[@]}" --bin kproxy
TESTBIN=${KPROXY_VM_TESTBIN:-}
[ -n "$TESTBIN" ] || TESTBIN=$(cargo test --locked "${PROFILE[@]}" --no-run --test integration --message-format=json |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])')
[ -x "$TESTBIN" ] || die "no integration test binary"
[ -x "$KPROXY" ] || die "no kproxy binary at $KPROXY"

# ---- 4. the initramfs ----
step "building the initramfs (kernel $KVER)"
STAGE=$(mktemp -d /tmp/kproxy-ipvs-vm.XXXXXX)
INITRD=$WORK/initrd.cpio.gz
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,test,var,lib/modules}
ln -s ../run "$STAGE/var/run"

copy_with_libs() { # SRC DEST: the file and the shared libraries ldd names for it
  mkdir -p "$STAGE$(dirname "$2")"
  cp -L "$1" "$STAGE$2"
  { ldd "$1" 2>/dev/null || true; } | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
    [ -e "$lib" ] || continue
    mkdir -p "$STAGE$(dirname "$lib")"
    [ -e "$STAGE$lib" ] || cp -L "$lib" "$STAGE$lib"
  done
}
copy_with_libs "$(command -v busybox)" /bin/busybox
for a in $("$STAGE/bin/busybox" --list); do
  [ -e "$STAGE/bin/$a" ] || ln -s busybox "$STAGE/bin/$a"
done
rm -f "$STAGE/bin/ip"                   # iproute2's ip: busybox's has no netns
ln -sf ../bin/busybox "$STAGE/sbin/modprobe"
copy_with_libs "$(command -v ip)" /usr/sbin/ip
copy_with_libs "$(command -v nft)" /usr/sbin/nft
copy_with_libs "$(command -v curl)" /usr/bin/curl
copy_with_libs "$(command -v ipvsadm)" /usr/sbin/ipvsadm
copy_with_libs "$(command -v xtables-nft-multi)" /usr/sbin/xtables-nft-multi
# The API client loads the system's roots even for the tests' plain-HTTP fake API server.
mkdir -p "$STAGE/etc/ssl/certs"
cp -L /etc/ssl/certs/ca-certificates.crt "$STAGE/etc/ssl/certs/"
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -s xtables-nft-multi "$STAGE/usr/sbin/$t"
done
# The Rust binaries without debug info: a smaller image boots faster.
copy_with_libs "$TESTBIN" /test/integration
copy_with_libs "$KPROXY" /test/kproxy
strip --strip-debug "$STAGE/test/integration" "$STAGE/test/kproxy"
for extra in ${KPROXY_VM_EXTRA_BINS:-}; do
  copy_with_libs "${extra#*=}" "/test/${extra%%=*}"
  strip --strip-debug "$STAGE/test/${extra%%=*}"
done

: > "$STAGE/etc/modules.order"
for m in $MODULES; do
  modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r src; do
  echo "${src#"$KROOT"}" >> "$STAGE/etc/modules.order"
done
mkdir -p "$STAGE/lib/modules/$KVER"
(cd "$KROOT" && find "lib/modules/$KVER/kernel/net/netfilter" "lib/modules/$KVER/kernel/net/ipv4/netfilter" \
  "lib/modules/$KVER/kernel/net/ipv6/netfilter" -name '*.ko' && sed 's|^/||' "$STAGE/etc/modules.order") |
  sort -u | (cd "$KROOT" && cpio --quiet -pdm "$STAGE")
cp "$MODDIR"/modules.order "$MODDIR"/modules.builtin* "$STAGE/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$STAGE" "$KVER"
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true

{
  # Emulation is several times slower than the host: give each awaited condition a minute.
  echo "export KPROXY_TEST_MODES=ipvs KPROXY_BIN=/test/kproxy KPROXY_TEST_DEADLINE=60 RUST_BACKTRACE=1"
  printf 'set --'
  printf ' %q' "${TEST_ARGS[@]}"
  echo
} > "$STAGE/test/env"
if [ -n "${KPROXY_VM_RUN:-}" ]; then
  printf '%s\n' "$KPROXY_VM_RUN" > "$STAGE/test/run.sh"
  if command -v strace >/dev/null; then copy_with_libs "$(command -v strace)" /usr/bin/strace; fi
  # perf (software clock events: TCG has no PMU) for profiles; kallsyms gives kernel symbols.
  if command -v perf >/dev/null; then copy_with_libs "$(readlink -f "$(command -v perf)")" /usr/bin/perf; fi
fi
cat > "$STAGE/init" <<'INIT'
#!/bin/sh
# PID 1 in the guest: mount, load modules, run the tests, print the result marker, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo "@@KPROXY-VM booted kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)s@@"
while read -r ko; do
  case $ko in
    *crc32c-intel*) insmod "$ko" 2>/dev/null ;;   # optional, needs SSE4.2
    *) insmod "$ko" || echo "insmod $ko failed" ;;
  esac
done < /etc/modules.order
/usr/sbin/ip link set lo up
. /test/env
cd /test
if [ -s /test/run.sh ]; then sh /test/run.sh; else ./integration "$@"; fi
rc=$?
echo "@@KPROXY-VM-RESULT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s@@"
sync
poweroff -f
INIT
chmod 755 "$STAGE/init"
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1 > "$INITRD"
echo "initramfs: $(du -h "$INITRD" | cut -f1)" >&2

# ---- 5. boot ----
case $ACCEL in
  tcg) ACC=(-accel tcg -cpu max) ;;
  kvm) ACC=(-enable-kvm -cpu host) ;;
  *) die "KPROXY_VM_ACCEL must be tcg or kvm" ;;
esac
LOG=$WORK/console.log
step "booting $KVER under qemu ($ACCEL, $SMP CPUs, timeout ${TIMEOUT}s); console in $LOG"
set +e
timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -m 1536 -smp "$SMP" \
  -nographic -no-reboot -nodefaults -serial stdio -display none -net none \
  -kernel "$VMLINUX" -initrd "$INITRD" -append "console=ttyS0 panic=-1 quiet" \
  </dev/null 2>&1 | sed -u 's/\r$//' | tee "$LOG"
set -e
result=$(grep -a '@@KPROXY-VM-RESULT' "$LOG" | tail -1 || true)
echo "ipvs-vm: wall time $(( $(date +%s) - START ))s" >&2
[ -n "$result" ] || { echo "ipvs-vm: the guest gave no result (crash or timeout)" >&2; exit 90; }
rc=$(echo "$result" | sed -n 's/.*rc=\([0-9]*\).*/\1/p')
exit "${rc:-90}"
}

main "$@"
