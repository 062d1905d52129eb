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

step() { printf '\n==> %s\n' "$*" >&2; }

step "installing what is missing"
scripts/install-deps.sh core s3 mongo docker
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_init
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

step "tests"
cargo nextest run --locked --no-fail-fast "${filter[@]}"

if [[ ${#filter[@]} -eq 0 ]]; then
    step "quick start (README)"
    out=$(BACKUPY_PROFILE=dev scripts/quickstart.sh 2>/dev/null)
    cmd=$(printf '%s\n' "$out" | grep -E '^  .*backupy-decrypt ' | sed 's/^ *//')
    restored="$BACKUPY_TEST_TMP/quickstart-restored.db"
    # Run the printed command, with the output redirected into the temp dir.
    eval "${cmd/--out restored.db/--out $restored}"
    [[ $(sqlite3 "$restored" 'PRAGMA integrity_check') == ok ]] || { echo "quick start restore is corrupt" >&2; exit 1; }
    [[ $(sqlite3 "$restored" 'SELECT count(*) FROM orders') == 3000 ]] || { echo "quick start restore lost rows" >&2; exit 1; }
    echo "quick start: backup restored, integrity ok, 3000 orders" >&2
fi

step "all green"
