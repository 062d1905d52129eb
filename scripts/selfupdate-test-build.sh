#!/usr/bin/env bash
# Builds the agent that tests/it/selfupdate.rs updates: a build whose compiled-in update key
# (BACKUPY_UPDATE_PUBKEY) is the public half of a P-256 key pair made here by openssl.
# Prints the variables the test reads, for `eval`:
#
#   eval "$(scripts/selfupdate-test-build.sh)"            # debug build (only this crate
#                                                        # is recompiled)
#   eval "$(scripts/selfupdate-test-build.sh --musl)"     # the static release build
#                                                        # (what CI does: scripts/test.sh)
#
# The key pair lives in target/selfupdate-test/keys and is reused, so repeated builds
# stay incremental. It signs test binaries only; it is never a release key.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/selfupdate-test
keys=$dir/keys
mkdir -p "$keys"
command -v openssl >/dev/null || { echo "openssl is missing: apt-get install openssl" >&2; exit 1; }
if [[ ! -s $keys/update.key ]]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$keys/update.key" 2>/dev/null
    openssl ec -in "$keys/update.key" -pubout -out "$keys/update.pub.pem" 2>/dev/null
fi
BACKUPY_UPDATE_PUBKEY=$(cat "$keys/update.pub.pem")
export BACKUPY_UPDATE_PUBKEY

if [[ ${1:-} == --musl ]]; then
    RELEASE_TARGETS=x86_64-unknown-linux-musl RELEASE_OUT=$dir/release scripts/release.sh >&2
    agent=$dir/release/x86_64-unknown-linux-musl/backupy-agent
else
    # In the main target dir: only this crate is recompiled (cargo tracks the variable),
    # and again by the next build without it. The copy keeps this build's binary.
    cargo build --locked --quiet --bin backupy-agent >&2
    agent=$dir/backupy-agent-debug
    cp "${CARGO_TARGET_DIR:-target}/debug/backupy-agent" "$agent"
fi
printf 'export BACKUPY_TEST_UPDATE_AGENT=%q\n' "$PWD/$agent"
printf 'export BACKUPY_TEST_UPDATE_KEY=%q\n' "$PWD/$keys/update.key"
