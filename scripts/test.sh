#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, starts throwaway
# services on loopback (scripts/services.sh), checks formatting and lints, runs every
# test, smoke-tests the README's quick start, and stops everything it started.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- <filter>     # only tests matching a nextest filter
set -euo pipefail
cd "$(dirname "$0")/.."

filter=()
if [[ ${1:-} == -- ]]; then
    shift
    filter=("$@")
fi

# Each step says when it starts (minutes:seconds into the run): where CI time goes.
step() { printf '\n==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

step "installing what is missing"
scripts/install-deps.sh core s3 mongo docker ship
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_init

trap 'services_stop_all' EXIT
# Services the tests talk to; each export its connection settings as BACKUPY_TEST_*.
# (The SQLite tests need none: rusqlite is bundled and the sqlite3 CLI judges restores.)
services_start_s3
services_start_postgres
services_start_mariadb
services_start_redis
services_start_mongo
# The Docker tests (tests/docker_*.rs) run databases in containers of their own.
services_start_dockerd

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

# Built once: the self-update tests update it, the size test measures it, and the quick
# start and the image smoke test run it. The builds run one after the other: each keeps
# both cores busy alone, and side by side this one and clippy took 12.7 min where one
# after the other they take 9.3 (docs/performance.md).
step "static musl release build (its update key: a test key made by openssl)"
static_t0=$SECONDS
if ! scripts/selfupdate-test-build.sh --musl >"$BACKUPY_TEST_TMP/static-build.env" \
    2>"$BACKUPY_TEST_TMP/static-build.log"; then
    cat "$BACKUPY_TEST_TMP/static-build.log" >&2
    echo "the static musl build failed (log above)" >&2
    exit 1
fi
grep -E '^(size|  +[0-9]+ KiB|largest)|built in' "$BACKUPY_TEST_TMP/static-build.log" >&2 || true
eval "$(cat "$BACKUPY_TEST_TMP/static-build.env")"
export BACKUPY_TEST_STATIC_BIN=$BACKUPY_TEST_UPDATE_AGENT
static_dir=$(dirname "$BACKUPY_TEST_STATIC_BIN")
echo "static build: $((SECONDS - static_t0)) s" >&2

step "building the tests"
cargo nextest run --locked --no-run

step "tests"
cargo nextest run --locked --no-fail-fast "${filter[@]}"

if [[ ${#filter[@]} -eq 0 ]]; then
    step "quick start (README), with the static binary"
    out=$(BACKUPY_BIN_DIR=$static_dir scripts/quickstart.sh 2>/dev/null)
    decrypt_cmd=$(printf '%s\n' "$out" | grep -E '^  .*backupy-decrypt ' | sed 's/^ *//')
    restored="$BACKUPY_TEST_TMP/quickstart-restored.db"
    # Run the printed command, with the output redirected into the temp dir.
    eval "${decrypt_cmd/--out restored.db/--out $restored}"
    [[ $(sqlite3 "$restored" 'PRAGMA integrity_check') == ok ]] || { echo "quick start restore is corrupt" >&2; exit 1; }
    [[ $(sqlite3 "$restored" 'SELECT count(*) FROM orders') == 3000 ]] || { echo "quick start restore lost rows" >&2; exit 1; }
    echo "quick start (static binary): backup restored, integrity ok, 3000 orders" >&2

    step "image smoke test (scratch image of the static binary, local dockerd)"
    scripts/image-smoke.sh "$BACKUPY_TEST_STATIC_BIN"
fi

step "all green"
