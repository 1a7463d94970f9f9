#!/usr/bin/env bash
# Static checks of the deployment files, for machines without Docker or kind
# (CI): every script in scripts/ passes `bash -n` and shellcheck; the scripts
# the Dockerfile writes into the image pass `sh -n` and shellcheck; every COPY
# source exists in the repo and is not excluded by .dockerignore; everything
# cargo needs to build the binary is copied; and, if kubectl is installed,
# `kubectl kustomize manifests/` renders the same objects as the files; no
# hostPath volume has a type a node may lack; and the kind scripts accept
# every mode kproxy has. The manifests themselves are checked by `cargo test --test manifests`.
#
#   scripts/check-deploy.sh
#
# Exits non-zero if any check fails, after running all of them.
set -Eeuo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${repo_root}"

failures=0
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    failures=$((failures + 1))
}
pass() { printf 'ok:   %s\n' "$*"; }

work_dir=$(mktemp -d)
trap 'rm -rf "${work_dir}"' EXIT

command -v shellcheck >/dev/null 2>&1 || { echo "shellcheck is not installed (apt-get install shellcheck)" >&2; exit 1; }

# --- scripts/ ----------------------------------------------------------------
for script in scripts/*.sh; do
    if ! bash -n "${script}"; then
        fail "${script}: bash -n"
    elif ! shellcheck -x "${script}"; then
        fail "${script}: shellcheck"
    else
        pass "${script}: bash -n, shellcheck"
    fi
done

# --- Dockerfile ----------------------------------------------------------------
# One logical instruction per line: join backslash continuations.
instructions="${work_dir}/instructions"
awk '
    in_heredoc { if ($0 == heredoc_end) in_heredoc = 0; next }
    /^[[:space:]]*#/ && line == "" { next }
    {
        text = $0
        if (match(text, /<<-?["\047]?[A-Za-z_]+["\047]?/)) {
            heredoc_end = substr(text, RSTART, RLENGTH)
            gsub(/^<<-?["\047]?|["\047]?$/, "", heredoc_end)
            in_heredoc = 1
        }
        if (sub(/\\[[:space:]]*$/, "", text)) { line = line text " "; next }
        print line text
        line = ""
    }
' Dockerfile >"${instructions}"

# Heredoc scripts (COPY <<'EOF' /path ... EOF): lint them like files.
heredoc_count=0
while IFS= read -r target; do
    heredoc_count=$((heredoc_count + 1))
    body="${work_dir}/heredoc-${heredoc_count}"
    awk -v target="${target}" '
        started && $0 == end { exit }
        started { print; next }
        $1 == "COPY" && index($0, "<<") && $NF == target {
            match($0, /<<-?["\047]?[A-Za-z_]+/)
            end = substr($0, RSTART, RLENGTH)
            gsub(/^<<-?["\047]?/, "", end)
            started = 1
        }
    ' Dockerfile >"${body}"
    shebang=$(head -n 1 "${body}")
    case "${shebang}" in
        '#!/bin/sh') shell="sh" ;;
        '#!/bin/bash' | '#!/usr/bin/env bash') shell="bash" ;;
        *) fail "Dockerfile heredoc ${target}: no #!/bin/sh or bash shebang"; continue ;;
    esac
    if ! "${shell}" -n "${body}"; then
        fail "Dockerfile heredoc ${target}: ${shell} -n"
    elif ! shellcheck -s "${shell}" "${body}"; then
        fail "Dockerfile heredoc ${target}: shellcheck (line numbers are within the heredoc)"
    else
        pass "Dockerfile heredoc ${target}: ${shell} -n, shellcheck"
    fi
done < <(grep -E '^COPY .*<<' Dockerfile | awk '{ print $NF }')
((heredoc_count > 0)) || fail "Dockerfile: found no heredoc scripts (iptables-wrapper, kproxy-node-prep)"

# COPY/ADD sources from the build context.
ignored_patterns=()
if [[ -f .dockerignore ]]; then
    while IFS= read -r pattern; do
        pattern=${pattern%/}
        pattern=${pattern#/}
        [[ -z "${pattern}" || "${pattern}" == \#* || "${pattern}" == *'*'* ]] && continue
        ignored_patterns+=("${pattern}")
    done <.dockerignore
fi
# ignored_by PATH: prints the .dockerignore pattern that excludes PATH or a
# parent of it (patterns with wildcards are not interpreted).
ignored_by() {
    local pattern
    for pattern in ${ignored_patterns[@]+"${ignored_patterns[@]}"}; do
        if [[ "$1" == "${pattern}" || "$1" == "${pattern}/"* ]]; then
            echo "${pattern}"
            return 0
        fi
    done
    return 1
}

copied=()
while read -r instruction args; do
    [[ "${instruction}" == COPY || "${instruction}" == ADD ]] || continue
    [[ "${args}" == *"<<"* || "${args}" == *--from=* ]] && continue
    read -r -a words <<<"${args}"
    sources=()
    for word in "${words[@]}"; do
        [[ "${word}" == --* ]] || sources+=("${word}")
    done
    unset 'sources[${#sources[@]}-1]' # the destination
    for source in ${sources[@]+"${sources[@]}"}; do
        source=${source%/}
        source=${source#./}
        if [[ ! -e "${source}" ]]; then
            fail "Dockerfile: ${instruction} source '${source}' does not exist in the repo"
            continue
        fi
        if pattern=$(ignored_by "${source}"); then
            fail "Dockerfile: ${instruction} source '${source}' is excluded by .dockerignore ('${pattern}')"
        fi
        copied+=("${source}")
        pass "Dockerfile: ${instruction} source '${source}' exists"
    done
done <"${instructions}"

# is_copied PATH: PATH is, or is under, a COPY source.
is_copied() {
    local source
    for source in ${copied[@]+"${copied[@]}"}; do
        [[ "$1" == "${source}" || "$1" == "${source}/"* ]] && return 0
    done
    return 1
}

# What `cargo build --bin kproxy` reads besides Cargo.toml and Cargo.lock:
# the bin and lib sources, build.rs, and files that src/ includes.
needed=(Cargo.toml Cargo.lock)
while IFS= read -r path; do needed+=("${path}"); done < <(
    awk '
        /^\[/ { section = $0 }
        (section == "[[bin]]" || section == "[lib]") && $1 == "path" {
            gsub(/^[^"]*"|".*$/, ""); print
        }
    ' Cargo.toml
)
[[ -f build.rs ]] && needed+=(build.rs)
if grep -Eq '^build[[:space:]]*=' Cargo.toml; then
    needed+=("$(sed -n 's/^build[[:space:]]*=[[:space:]]*"\(.*\)"/\1/p' Cargo.toml)")
fi
if grep -q '^\[workspace\]' Cargo.toml; then
    fail "Cargo.toml declares a workspace: the Dockerfile copies only the root crate"
fi
while IFS=: read -r file include; do
    resolved=$(realpath -m --relative-to=. "$(dirname "${file}")/${include}")
    needed+=("${resolved}")
done < <(grep -rEo 'include_(str|bytes)!\("[^"]+"\)' src 2>/dev/null \
    | sed -E 's/include_(str|bytes)!\("([^"]+)"\)/\2/' || true)
for path in "${needed[@]}"; do
    if ! is_copied "${path}"; then
        fail "Dockerfile: cargo needs '${path}' to build kproxy, but no COPY brings it in"
    elif [[ ! -e "${path}" ]]; then
        fail "Dockerfile: cargo needs '${path}', which does not exist"
    elif pattern=$(ignored_by "${path}"); then
        fail "Dockerfile: cargo needs '${path}', which .dockerignore excludes ('${pattern}')"
    else
        pass "Dockerfile: cargo's input '${path}' is copied"
    fi
done

# --- hostPath volumes ---------------------------------------------------------
# A hostPath `type` that checks for something a node may lack (/lib/modules on
# a microVM or a monolithic kernel, say) keeps the pod from ever starting on
# that node, and a node without kproxy has no Services. Untyped, or
# DirectoryOrCreate / FileOrCreate, start everywhere.
hostpath_types="${work_dir}/hostpath-types"
while IFS= read -r file; do
    awk -v file="${file}" '
        function indent_of(line) { match(line, /^[ -]*/); return RLENGTH }
        function check(type) {
            gsub(/["\047]/, "", type)
            print file ":" NR ": hostPath type " (type == "" ? "(none)" : type)
        }
        /^[[:space:]]*#/ { next }
        in_hostpath && NF && indent_of($0) <= hostpath_indent { in_hostpath = 0 }
        in_hostpath && match($0, /^[ -]*type:[[:space:]]*[^[:space:]#]+/) {
            type = substr($0, RSTART, RLENGTH); sub(/^[ -]*type:[[:space:]]*/, "", type); check(type)
        }
        /^[ -]*hostPath:/ {
            if (match($0, /type:[[:space:]]*[^,}[:space:]]+/)) {
                type = substr($0, RSTART, RLENGTH); sub(/^type:[[:space:]]*/, "", type); check(type)
            } else if ($0 ~ /hostPath:[[:space:]]*$/) {
                in_hostpath = 1; hostpath_indent = indent_of($0)
            }
        }
    ' "${file}"
done < <(find manifests -name '*.yaml' -o -name '*.yml' | sort) >"${hostpath_types}"
typed_count=0
while IFS= read -r found; do
    typed_count=$((typed_count + 1))
    case "${found##* }" in
        DirectoryOrCreate | FileOrCreate) pass "${found}: created when missing" ;;
        *) fail "${found}: a node without that path never starts the pod; drop the type (as kubeadm's kube-proxy does) or use DirectoryOrCreate/FileOrCreate" ;;
    esac
done <"${hostpath_types}"
pass "manifests/: ${typed_count} typed hostPath volume(s) checked"

# --- proxy modes in the kind scripts ------------------------------------------
# Every mode kproxy has (ProxyMode's names in src/config/mod.rs) is accepted by
# check_proxy_mode and named in each kind script's usage.
kproxy_modes=$(sed -n 's/^[[:space:]]*ProxyMode::[A-Za-z]* => "\([a-z]*\)",*$/\1/p' src/config/mod.rs | sort -u)
[[ -n "${kproxy_modes}" ]] || fail "src/config/mod.rs: found no ProxyMode names (ProxyMode::X => \"name\")"
for mode in ${kproxy_modes}; do
    # shellcheck source=scripts/lib-kind.sh
    if (source scripts/lib-kind.sh && trap - ERR && check_proxy_mode "${mode}") >/dev/null 2>&1; then
        pass "scripts/lib-kind.sh: check_proxy_mode accepts ${mode}"
    else
        fail "scripts/lib-kind.sh: check_proxy_mode refuses ${mode}, a mode kproxy has (proxy_modes)"
    fi
    for script in scripts/kind-up.sh scripts/kind-e2e.sh; do
        if grep -Eq -- "--proxy-mode [a-z|]*\b${mode}\b" "${script}"; then
            pass "${script}: usage names ${mode}"
        else
            fail "${script}: usage (--proxy-mode a|b|c) does not name ${mode}"
        fi
    done
done
if (source scripts/lib-kind.sh && trap - ERR && check_proxy_mode no-such-mode) >/dev/null 2>&1; then
    fail "scripts/lib-kind.sh: check_proxy_mode accepts a mode kproxy does not have"
fi

# --- manifests/ with kustomize -----------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
    if rendered=$(kubectl kustomize manifests/ 2>"${work_dir}/kustomize.err"); then
        from_k=$(grep -c '^kind: ' <<<"${rendered}" || true)
        from_f=$(cat manifests/*.yaml | grep -c '^kind: ' || true)
        if [[ "${from_k}" == "${from_f}" ]]; then
            pass "kubectl kustomize manifests/: ${from_k} objects, as many as the files hold"
        else
            fail "kubectl kustomize manifests/ renders ${from_k} objects, the files hold ${from_f}"
        fi
    else
        fail "kubectl kustomize manifests/: $(cat "${work_dir}/kustomize.err")"
    fi
else
    echo "skip: kubectl not installed, kustomize rendering not checked"
fi

if ((failures > 0)); then
    echo "${failures} check(s) failed" >&2
    exit 1
fi
echo "all deployment checks passed"
