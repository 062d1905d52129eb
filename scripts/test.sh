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
services_start_postgres_tls
services_start_mariadb
services_start_mariadb_tls
services_start_redis
services_start_redis_tls
services_start_mongo
services_start_moto
# The Docker tests (tests/docker_*.rs) run databases in containers of their own.
services_start_dockerd

step "cargo fmt --check"
cargo fmt --all -- --check

# `cargo clippy --all-targets -- -D warnings`, done while the tests are built: cargo
# clippy is `cargo check` with clippy-driver as the workspace's compiler wrapper and the
# lint flags in CLIPPY_ARGS (clippy's src/main.rs), and a check pass of its own compiled
# every dependency a third time (about 3.5 min here). The wrapper lints the library,
# binaries, tests and examples as they are compiled; any warning, from rustc or clippy,
# fails the step even if a later clippy read CLIPPY_ARGS differently.
lint_env=(RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
    CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__")
[[ -x ${lint_env[0]#*=} ]] || { echo "clippy-driver is missing: rustup component add clippy" >&2; exit 1; }
step "building the tests, with clippy's lints as errors"
env "${lint_env[@]}" cargo nextest run --locked --no-run 2>&1 | tee "$BACKUPY_TEST_TMP/test-build.log" >&2
if grep -q '^warning' "$BACKUPY_TEST_TMP/test-build.log"; then
    echo "the build printed warnings (above): fix them, CI treats them as errors" >&2
    exit 1
fi

# Built once: the self-update tests update it, the size test measures it, and the quick
# start and the image smoke test run it. After the test build, not beside it: each build
# keeps both cores busy alone, and two side by side took longer than one after the other
# (docs/performance.md#ci-time).
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

step "tests"
# The same environment as the build, so nothing is rebuilt.
env "${lint_env[@]}" cargo nextest run --locked --no-fail-fast "${filter[@]}"

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
