#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: installs, with apt, the Debian packages whose
# commands are missing, saying which, before the script runs (as scripts/ipvs-vm.sh does for
# its own). KPROXY_NO_APT=1 only reports what is missing.
#
#   ensure_commands "script name" command:package ...

ensure_commands() {
  local who=$1
  shift
  local missing_cmds="" packages="" pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1; then
      missing_cmds="$missing_cmds $cmd"
      case " $packages " in *" $pkg "*) ;; *) packages="$packages $pkg" ;; esac
    fi
  done
  [ -z "$packages" ] && return 0
  if [ "$(id -u)" != 0 ] || [ "${KPROXY_NO_APT:-}" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: missing${missing_cmds}; install:${packages} (apt-get install${packages})" >&2
    return 1
  fi
  echo "==> $who: installing${packages} (missing:${missing_cmds})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -o DPkg::Lock::Timeout=300
  # shellcheck disable=SC2086 # one word per package
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 $packages
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || { echo "$who: ${pair%%:*} still missing after apt-get" >&2; return 1; }
  done
}

# Rust is not a Debian package recent enough here (kproxy needs 1.85): say so instead.
ensure_cargo() {
  command -v cargo >/dev/null 2>&1 && return 0
  echo "$1: cargo is missing: install Rust 1.85 or newer (https://rustup.rs), then run again" >&2
  return 1
}
