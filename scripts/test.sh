#!/usr/bin/env bash
# Every check the project has: formatting, lints, build, unit and end-to-end tests, and the
# benchmark's smoke mode. Needs root and a kernel with KSM for the ksmd tests; elsewhere those
# tests skip with a message (set KSMPLUS_REQUIRE_KSM=1 to make a skip fail, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo build (debug: the shim and binaries the end-to-end tests run)"
cargo build --workspace
step "cargo test"
cargo test --workspace -- --test-threads="${KSMPLUS_TEST_THREADS:-2}"
if [ -f ksmplus-bench/src/main.rs ] && grep -q -- '--smoke' ksmplus-bench/src/*.rs 2>/dev/null; then
    step "benchmark smoke run (release: the bench finds the shim and the agent next to itself)"
    cargo build --release -p ksmplus-preload -p ksmplus-agentd -p ksmplus-bench
    cargo run --release -p ksmplus-bench -- --smoke --require-ksmplus
fi
