#!/usr/bin/env bash
# kproxy's test command (what .ci/run calls): unit tests, manifest validation, and the
# network-namespace integration tests with real packets (they need root; as non-root they are
# listed as ignored), then the static checks of the deployment scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked
bash scripts/check-deploy.sh
