#!/usr/bin/env bash
# Fuzzes kproxy's parsers and pure converters with cargo-fuzz (libFuzzer), each target for a
# bounded time, and fails if any input crashes one. Targets (fuzz/fuzz_targets/):
#   manifests     manifest text -> objects -> the model (and the Ingress route builder)
#   framing       the HTTP/1 framing scanner; its verdict must not depend on read boundaries
#   annotations   the ingress-nginx annotation parsers
#   routes        arbitrary Ingresses -> route table -> matching and rewriting requests
#   ipvs_netlink  the IPVS generic-netlink reply decoders
#   nft_netlink   the nf_tables netlink decoders (dump replies, echoes, errors)
#
#   scripts/fuzz.sh                 # every target, 10 s each (what scripts/test.sh runs)
#   scripts/fuzz.sh 600             # every target, 10 minutes each
#   scripts/fuzz.sh 3600 routes     # one target for an hour
#
# The corpus grows in fuzz/corpus/TARGET (not committed; fuzz/seeds/TARGET are the committed
# starting points). A crash leaves its input in fuzz/artifacts/TARGET/ and this script prints
# how to replay it; turn it into a unit test next to the code it broke.
#
# cargo-fuzz passes rustc the -Z options that add libFuzzer's coverage instrumentation, which
# only a nightly rustc accepts. The machine has one stable toolchain and no other can be
# fetched, so RUSTC_BOOTSTRAP=1 lets the stable rustc accept them. No sanitizer: the code is
# safe Rust (#![forbid(unsafe_code)]), so what a sanitizer would add is slower runs; overflow
# checks and debug assertions stay on (-a) and catch arithmetic mistakes.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
shift || true
all_targets=(manifests framing annotations routes ipvs_netlink nft_netlink)
targets=("$@")
((${#targets[@]} > 0)) || targets=("${all_targets[@]}")

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    # libfuzzer-sys compiles libFuzzer's C++ sources.
    apt-get install -y g++
fi
export RUSTC_BOOTSTRAP=1
# Short runs (the smoke test scripts/test.sh runs) build unoptimised: the build is what costs
# there (an optimised build of the crate and its dependencies took 33 min on a loaded 2-core
# machine, an unoptimised one under 10), and 10 s of slower executions still cover the seeds
# and their neighbourhood. Longer runs build optimised, with 16 codegen units: a build several
# times faster than one unit, for runs a little slower.
flags=(--sanitizer none --debug-assertions)
if ((seconds <= 60)); then
    flags+=(--dev)
else
    flags+=(--codegen-units 16)
fi

echo "fuzz: building ${targets[*]}"
for target in "${targets[@]}"; do
    cargo fuzz build "${flags[@]}" "${target}"
done

failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/${target}"
    seeds="fuzz/seeds/${target}"
    mkdir -p "${corpus}" "${seeds}" "fuzz/artifacts/${target}"
    log=$(mktemp)
    echo "fuzz: ${target} for ${seconds}s"
    if cargo fuzz run "${flags[@]}" "${target}" "${corpus}" "${seeds}" -- \
        -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"${log}" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}" | tail -n 1)
        cov=$(grep -Eo 'cov: [0-9]+' "${log}" | tail -n 1 || true)
        echo "fuzz: ${target}: ${runs:-?} executions, ${cov:-cov: ?}, corpus $(find "${corpus}" -type f | wc -l) inputs, no crash"
    else
        tail -n 40 "${log}" >&2
        echo "fuzz: ${target} CRASHED; replay: RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} ${target} fuzz/artifacts/${target}/<file>" >&2
        failed+=("${target}")
    fi
    rm -f "${log}"
done
if ((${#failed[@]} > 0)); then
    echo "fuzz: crashes in ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} target(s), no crash"
