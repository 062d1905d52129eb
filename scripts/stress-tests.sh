#!/usr/bin/env bash
# The whole test suite N times (default 5) while another process keeps one core busy:
# a race that a quiet machine hides shows up here. Builds once and starts the services
# once (scripts/services.sh), runs `cargo nextest run --no-fail-fast --retries 0` N times,
# then prints each test that failed at least once, how often, and its first error line.
# Stops everything it started (services, the busy process), however it exits.
#
#   scripts/stress-tests.sh            # 5 runs
#   scripts/stress-tests.sh 2          # 2 runs
#   scripts/stress-tests.sh 3 -E 'test(/^connected::/)'   # extra nextest arguments
#
# Exit status: 0 when every run passed, 1 when a test failed in any run.
# Environment: STRESS_BUSY_CORES (default 1) cores kept busy; STRESS_KEEP_REPORTS=DIR
# keeps the JUnit report of each run there.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N] [nextest args...]" >&2; exit 2; }
shift || true
extra=("$@")
busy_cores=${STRESS_BUSY_CORES:-1}

step() { printf '\n==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

step "installing what is missing"
scripts/install-deps.sh core s3 mongo docker ship stress
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_init

busy_pid=
reports=
cleanup() {
    local rc=$?
    if [[ -n $busy_pid ]]; then
        # The busy process runs in a session of its own: its whole group goes.
        kill -s TERM -- "-$busy_pid" 2>/dev/null || true
        wait "$busy_pid" 2>/dev/null || true
    fi
    [[ -n $reports && -d $reports ]] && rm -rf "$reports"
    services_stop_all
    exit "$rc"
}
# Replaces the EXIT trap of services_init (services_stop_all is called from cleanup).
trap cleanup EXIT

services_start_s3
services_start_postgres
services_start_mariadb
services_start_redis
services_start_mongo
services_start_dockerd

# The same compiler wrapper and lint flags as scripts/test.sh: the same build, not a
# second one.
lint_env=(RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
    CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__")
step "building the tests"
env "${lint_env[@]}" cargo nextest run --locked --no-run

step "static musl release build (the self-update and size tests use it)"
build_env=$(mktemp)
if ! scripts/selfupdate-test-build.sh --musl >"$build_env" 2>"$build_env.log"; then
    cat "$build_env.log" >&2
    rm -f "$build_env" "$build_env.log"
    echo "the static musl build failed (log above)" >&2
    exit 1
fi
eval "$(cat "$build_env")"
rm -f "$build_env" "$build_env.log"
export BACKUPY_TEST_STATIC_BIN=$BACKUPY_TEST_UPDATE_AGENT

step "keeping $busy_cores core(s) busy"
if command -v stress-ng >/dev/null; then
    setsid stress-ng --cpu "$busy_cores" --cpu-method int64 --quiet >/dev/null 2>&1 &
    busy_pid=$!
    busy_what="stress-ng --cpu $busy_cores"
else
    # shellcheck disable=SC2016
    setsid bash -c 'for ((i = 0; i < $1; i++)); do yes >/dev/null & done; wait' _ "$busy_cores" &
    busy_pid=$!
    busy_what="$busy_cores × yes >/dev/null"
fi
sleep 1
kill -0 "$busy_pid" 2>/dev/null || { echo "the busy process ($busy_what) did not start" >&2; exit 1; }

reports=$(mktemp -d "${TMPDIR:-/tmp}/stress-reports.XXXXXX")
junit=${CARGO_TARGET_DIR:-target}/nextest/stress/junit.xml
declare -a summary=()
for ((run = 1; run <= runs; run++)); do
    step "run $run of $runs (load average: $(cut -d' ' -f1-3 /proc/loadavg); busy: $busy_what)"
    rm -f "$junit"
    t0=$SECONDS
    rc=0
    env "${lint_env[@]}" cargo nextest run --locked --profile stress --no-fail-fast --retries 0 \
        "${extra[@]}" || rc=$?
    [[ -f $junit ]] || { echo "nextest wrote no JUnit report (exit status $rc)" >&2; exit 1; }
    cp "$junit" "$reports/run-$run.xml"
    summary+=("run $run: exit status $rc, $((SECONDS - t0)) s, load average after: $(cut -d' ' -f1-3 /proc/loadavg)")
done

if [[ -n ${STRESS_KEEP_REPORTS:-} ]]; then
    mkdir -p "$STRESS_KEEP_REPORTS"
    cp "$reports"/run-*.xml "$STRESS_KEEP_REPORTS"/
fi

step "result"
printf '%s\n' "${summary[@]}"
# Python parses the JUnit XML: each failure's message is the first line of the panic (or
# nextest's reason, e.g. a timeout).
python3 - "$runs" "$reports"/run-*.xml <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET

runs = int(sys.argv[1])
failed = {}  # test -> [count, first error line]
total = set()
for path in sys.argv[2:]:
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')} {case.get('name')}"
        total.add(name)
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        text = "\n".join(x for x in [bad.get("message"), bad.text] + [
            (e.text or "") for e in case.iter() if e.tag in ("system-err", "system-out")] if x)
        # The first line after "panicked at FILE:LINE:" is the assertion's own message;
        # assert_eq! puts the two values on the next lines.
        m = re.search(r"panicked at ([^\n]*):\n\s*([^\n]*)((?:\n\s*(?:left|right):[^\n]*){0,2})", text)
        if m:
            values = " ".join(line.strip() for line in m.group(3).splitlines() if line.strip())
            first = f"{m.group(2).strip()} {values} ({m.group(1)})".replace("  ", " ")
        else:
            first = bad.get("type") or "failed"
        entry = failed.setdefault(name, [0, first[:200]])
        entry[0] += 1

print(f"\n{len(total)} tests, {runs} runs: {len(failed)} failed at least once")
if failed:
    print("\n| test | failed | first error |\n|---|---:|---|")
    for name, (n, first) in sorted(failed.items(), key=lambda kv: (-kv[1][0], kv[0])):
        print(f"| {name} | {n}/{runs} | {first.replace('|', '/')} |")
sys.exit(1 if failed else 0)
EOF
