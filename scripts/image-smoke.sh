#!/usr/bin/env bash
# Container smoke test against a local dockerd (no base image can be pulled here): builds
# the Dockerfile's `runtime` stage from the locally built static binary behind a local
# `builder` stage (FROM scratch), runs it with --network host as user 10001, and checks
# that it backs up a SQLite file and a Redis server to the local S3 server (each backup
# then verified with the image itself), that its HEALTHCHECK turns healthy, and that its
# process really runs as uid 10001. Also validates docs/compose/docker-compose.yml with
# docker-compose.
#
#   scripts/image-smoke.sh [BINARY]   # default: the static musl release binary
#
# Starts dockerd, s3s-fs and redis-server with scripts/services.sh; stops all of them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
bin=${1:-target/x86_64-unknown-linux-musl/release/backupy-agent}
[[ -x $bin ]] || { echo "image-smoke: $bin not found: build it with scripts/release.sh" >&2; exit 1; }
if readelf -l "$bin" | grep -q INTERP; then
    echo "image-smoke: $bin is dynamically linked; a scratch image needs the static build (scripts/release.sh)" >&2
    exit 1
fi
step() { printf '==> %s\n' "$*" >&2; }
fail() { echo "image-smoke: FAILED: $*" >&2; exit 1; }

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_init
services_start_dockerd
services_start_s3
services_start_redis
command -v docker-compose >/dev/null || fail "docker-compose is missing: apt-get install docker-compose"
export DOCKER_BUILDKIT=0

work=$BACKUPY_TEST_TMP/image-smoke
mkdir -p "$work/ctx" "$work/etc" "$work/data"
tag=backupy-agent:smoke-$$
name=backupy-smoke-$$
cleanup_container() { docker rm -f "$name" >/dev/null 2>&1 || true; docker rmi -f "$tag" >/dev/null 2>&1 || true; }
trap 'cleanup_container; services_stop_all' EXIT

step "building $tag from $bin (the Dockerfile's runtime stage, FROM scratch)"
cp "$bin" "$work/ctx/backupy-agent"
dist/docker/rootfs.sh "$work/ctx/rootfs"
{
    echo "FROM scratch AS builder"
    echo "COPY rootfs/ /rootfs/"
    echo "COPY backupy-agent /backupy-agent"
    sed -n '/^FROM scratch AS runtime/,$p' Dockerfile
} >"$work/ctx/Dockerfile"
grep -q '^HEALTHCHECK' "$work/ctx/Dockerfile" || fail "the Dockerfile has no runtime stage with a HEALTHCHECK"
docker build -q -t "$tag" "$work/ctx" >/dev/null

step "running it as user 10001 with --network host"
bucket=smoke$$
mkdir -p "$BACKUPY_TEST_S3_DIR/$bucket"
"$bin" keygen --out "$work/etc/backupy.key" >"$work/etc/backupy.pub" 2>/dev/null
sqlite3 "$work/data/app.db" "CREATE TABLE t(x); INSERT INTO t VALUES (1),(2),(3);"
redis-cli -h 127.0.0.1 -p "$BACKUPY_TEST_REDIS_PORT" -a "$BACKUPY_TEST_REDIS_PASSWORD" --no-auth-warning SET smoke yes >/dev/null
metrics_port=$(services_free_port)
cat >"$work/etc/backupy.toml" <<TOML
state_dir = "/var/lib/backupy"
[storage.s3]
endpoint = "$BACKUPY_TEST_S3_ENDPOINT"
region = "$BACKUPY_TEST_S3_REGION"
bucket = "$bucket"
access_key_id = "env:S3_KEY"
secret_access_key = "env:S3_SECRET"
[encryption]
recipient = "file:backupy.pub"
identity = "backupy.key"
[[targets]]
id = "app"
type = "sqlite"
path = "/data/app.db"
[[targets]]
id = "cache"
type = "redis"
url = "redis://127.0.0.1:$BACKUPY_TEST_REDIS_PORT"
password = "env:REDIS_PASSWORD"
[[jobs]]
id = "app-often"
target = "app"
cron = "*/3 * * * * *"
[[jobs]]
id = "cache-often"
target = "cache"
cron = "*/3 * * * * *"
TOML
chown -R 10001:10001 "$work/data"
chmod 644 "$work/etc/"*
run_opts=(--network host --user 10001
    -v "$work/etc:/etc/backupy:ro" -v "$work/data:/data"
    -e S3_KEY="$BACKUPY_TEST_S3_ACCESS_KEY" -e S3_SECRET="$BACKUPY_TEST_S3_SECRET_KEY"
    -e REDIS_PASSWORD="$BACKUPY_TEST_REDIS_PASSWORD"
    -e BACKUPY_METRICS_LISTEN_ADDR="127.0.0.1:$metrics_port")
docker run -d --name "$name" --health-interval 1s --health-start-period 2s "${run_opts[@]}" "$tag" >/dev/null

health=
for _ in $(seq 60); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$name")
    [[ $health == healthy ]] && break
    [[ $(docker inspect -f '{{.State.Running}}' "$name") == true ]] || break
    sleep 1
done
[[ $health == healthy ]] || { docker logs "$name" >&2; fail "the container is not healthy (health: $health)"; }
pid=$(docker inspect -f '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[[ $uid == 10001 ]] || fail "the agent runs as uid $uid, not 10001"
echo "healthy, agent pid $pid runs as uid $uid" >&2

step "waiting for a SQLite and a Redis backup in S3, verifying each with the image"
for job in app-often cache-often; do
    ok=0
    for _ in $(seq 60); do
        if docker run --rm "${run_opts[@]}" "$tag" verify --config /etc/backupy/backupy.toml \
            --backup latest --job "$job" >"$work/verify.out" 2>"$work/verify.err"; then
            ok=1
            break
        fi
        sleep 1
    done
    ((ok)) || { cat "$work/verify.out" "$work/verify.err" >&2; docker logs "$name" >&2; fail "no verifiable $job backup in S3"; }
    echo "$job: $(cut -f2,4- "$work/verify.out")" >&2
done
docker stop -t 20 "$name" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
[[ $code == 0 ]] || { docker logs "$name" >&2; fail "the agent exited $code after docker stop"; }

step "docker-compose config: docs/compose/docker-compose.yml"
(cd docs/compose && docker-compose -f docker-compose.yml config -q) || fail "docs/compose/docker-compose.yml is invalid"

echo "image smoke: non-root (uid 10001), healthy, SQLite and Redis backed up to S3 and verified, compose file valid" >&2
