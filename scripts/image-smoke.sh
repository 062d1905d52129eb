#!/usr/bin/env bash
# Container smoke test against a local dockerd (no base image can be pulled here): builds
# the Dockerfile's `runtime` stage from the locally built static binary behind a local
# `builder` stage (FROM scratch), runs it with --network host as user 10001, and checks
# that it backs up a SQLite file and a Redis server to the local S3 server (each backup
# then verified with the image itself), that its HEALTHCHECK turns healthy, and that its
# process really runs as uid 10001. Then validates docs/compose/docker-compose.yml with
# docker-compose and brings the example up (a stand-in postgres:16, host networking):
# its agent must turn healthy and back PostgreSQL up through DOCKER_EXEC, proven by a
# restore through the container and a row comparison.
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

# Waits up to 60 s for container $1's HEALTHCHECK to say healthy, then checks that its
# process runs as uid 10001.
expect_healthy_as_10001() {
    local id=$1 health='' pid uid
    for _ in $(seq 60); do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        [[ $health == healthy ]] && break
        [[ $(docker inspect -f '{{.State.Running}}' "$id") == true ]] || break
        sleep 1
    done
    [[ $health == healthy ]] || { docker logs "$id" >&2; fail "container $id is not healthy (health: $health)"; }
    pid=$(docker inspect -f '{{.State.Pid}}' "$id")
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    [[ $uid == 10001 ]] || fail "the agent in container $id runs as uid $uid, not 10001"
    echo "healthy, agent pid $pid runs as uid $uid" >&2
}
expect_healthy_as_10001 "$name"

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

# ---------------------------------------------------------------- the compose example
# docs/compose runs as written, from a copy, with only what this machine forces changed:
# an override file puts both services on the host network (no bridge here), mounts the
# throwaway daemon's socket where the example mounts /var/run/docker.sock, sets a free
# metrics port and a short health interval; the copy of backupy.toml points at the local
# S3 server and fires every 3 s instead of at 03:00. `postgres:16` cannot be pulled: a
# stand-in with that tag is built from this machine's PostgreSQL (see standin_postgres).
pg_bindir() {
    local major
    major=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1)
    [[ -n $major && -x /usr/lib/postgresql/$major/bin/postgres ]] ||
        fail "no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql"
    echo "/usr/lib/postgresql/$major/bin"
}

# A self-contained image (no host mounts: the example mounts none) that behaves like the
# official one as far as the example uses it: POSTGRES_DB, POSTGRES_USER and
# POSTGRES_PASSWORD_FILE initialise an empty data volume, the server runs as a non-root
# user, and pg_dump, pg_restore, psql and sh are on the PATH for DOCKER_EXEC.
standin_postgres() {
    local tag=$1 ctx=$work/pg-ctx bin lib share f
    bin=$(pg_bindir)
    lib=$(dirname "$bin")/lib
    share=/usr/share/postgresql/$(basename "$(dirname "$bin")")
    rm -rf "$ctx"
    # owned/: the directories the server writes, copied with --chown (COPY makes root own
    # everything else).
    mkdir -p "$ctx/rootfs/etc" "$ctx/owned/var/run/postgresql" "$ctx/owned/var/lib/postgresql/data"
    local files=(/bin/sh "$bin"/{postgres,initdb,pg_dump,pg_restore,psql})
    # initdb loads plpgsql and the snowball dictionaries; llvmjit would drag in LLVM.
    for f in "$lib"/*.so; do
        [[ $f == */llvmjit* ]] || files+=("$f")
    done
    {
        printf '%s\n' "${files[@]}"
        ldd "${files[@]}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*[^:]$/ {print $1}'
    } | sort -u | while read -r f; do cp -L --parents "$f" "$ctx/rootfs/" || exit 1; done
    tar -C / -cf - "${share#/}" usr/share/zoneinfo | tar -C "$ctx/rootfs" -xf -
    printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh\n' \
        >"$ctx/rootfs/etc/passwd"
    printf 'root:x:0:\npostgres:x:999:\n' >"$ctx/rootfs/etc/group"
    cat >"$ctx/rootfs/entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$POSTGRES_PASSWORD_FILE" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 --no-sync >/dev/null
    echo "CREATE DATABASE \"$POSTGRES_DB\";" | postgres --single -j -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses=''
SH
    chmod 755 "$ctx/rootfs/entrypoint.sh"
    chmod 700 "$ctx/owned/var/lib/postgresql/data"
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
COPY --chown=999:999 owned/ /
ENV PATH=$bin:/usr/bin:/bin PGDATA=/var/lib/postgresql/data TZ=UTC
USER 999:999
ENTRYPOINT ["/entrypoint.sh"]
DOCKERFILE
    docker build -q -t "$tag" "$ctx" >/dev/null
}

step "the compose example: docs/compose with a stand-in postgres:16, its agent service from $tag"
docker image inspect postgres:16 >/dev/null 2>&1 && fail "this daemon already has a postgres:16 image; the smoke test builds its own stand-in"
standin_postgres postgres:16
docker tag "$tag" backupy-agent:latest
project=backupy-compose-$$
croot=$work/compose-root
cdir=$croot/docs/compose
compose=(docker-compose -p "$project" -f docker-compose.yml -f smoke-override.yml)
cleanup_compose() {
    (cd "$cdir" 2>/dev/null && "${compose[@]}" down -v -t 5 >/dev/null 2>&1) || true
    docker rmi -f postgres:16 backupy-agent:latest >/dev/null 2>&1 || true
}
trap 'cleanup_compose; cleanup_container; services_stop_all' EXIT
mkdir -p "$croot/docs"
cp -r docs/compose "$croot/docs/"
bucket=compose$$
mkdir -p "$BACKUPY_TEST_S3_DIR/$bucket"
sed -i -e "s|^endpoint = .*|endpoint = \"$BACKUPY_TEST_S3_ENDPOINT\"|" \
    -e "s|^region = .*|region = \"$BACKUPY_TEST_S3_REGION\"|" \
    -e "s|^bucket = .*|bucket = \"$bucket\"|" \
    -e 's|^cron = .*|cron = "*/3 * * * * *"|' "$cdir/backupy.toml"
if ! grep -q "^endpoint = \"$BACKUPY_TEST_S3_ENDPOINT\"" "$cdir/backupy.toml" ||
    ! grep -q '^cron = "\*/3' "$cdir/backupy.toml"; then
    fail "docs/compose/backupy.toml no longer has the endpoint and cron lines this test rewrites"
fi
compose_metrics=$(services_free_port)
cat >"$cdir/smoke-override.yml" <<YAML
services:
  postgres:
    network_mode: host
  backupy-agent:
    network_mode: host
    volumes:
      - $BACKUPY_TEST_DOCKER_SOCKET:/var/run/docker.sock
    environment:
      BACKUPY_METRICS_LISTEN_ADDR: 127.0.0.1:$compose_metrics
    healthcheck:
      interval: 1s
      start_period: 2s
YAML
pg_password=$(openssl rand -hex 12)
(
    # The example's own set-up commands, as its comments give them.
    cd "$cdir"
    mkdir -p secrets
    printf '%s' "$pg_password" >secrets/pg_password.txt
    printf '%s' "$BACKUPY_TEST_S3_ACCESS_KEY" >secrets/s3_access_key.txt
    printf '%s' "$BACKUPY_TEST_S3_SECRET_KEY" >secrets/s3_secret_key.txt
    docker run --rm --user "$(id -u)" -v "$PWD:/k" backupy-agent keygen --out /k/backupy.key >backupy.pub
    DOCKER_GID=$(stat -c %g "$BACKUPY_TEST_DOCKER_SOCKET") "${compose[@]}" up -d --no-build
) >"$work/compose-up.log" 2>&1 || { cat "$work/compose-up.log" >&2; fail "docker-compose up failed for the compose example"; }
agent_id=$(cd "$cdir" && "${compose[@]}" ps -q backupy-agent)
[[ -n $agent_id ]] || fail "the compose example's agent service did not start"

pg_exec() { docker exec -e PGPASSWORD="$pg_password" app-postgres psql -X -A -t -v ON_ERROR_STOP=1 -U app "$@"; }
ok=0
for _ in $(seq 60); do
    pg_exec -d app -c 'SELECT 1' >/dev/null 2>&1 && { ok=1; break; }
    sleep 1
done
((ok)) || { docker logs app-postgres >&2; fail "the stand-in postgres:16 did not come up"; }
pg_exec -d app -c "CREATE TABLE orders(id int PRIMARY KEY, item text);
    INSERT INTO orders SELECT g, 'item-' || g FROM generate_series(1, 500) g;" >/dev/null

expect_healthy_as_10001 "$agent_id"

# Restored from the host with the same storage and key, through the container's own
# pg_restore, into a new database; then the rows are counted. A backup taken before the
# table existed restores no table, so the newest is tried until one holds it.
sed -E "s|file:/run/secrets/([a-z0-9_]+)|file:$cdir/secrets/\1.txt|" "$cdir/backupy.toml" >"$work/compose-host.toml"
cp "$cdir/backupy.pub" "$work/backupy.pub"
pg_exec -d app -c 'CREATE DATABASE app_restored' >/dev/null
rows=
for _ in $(seq 60); do
    pg_exec -d app_restored -c 'DROP TABLE IF EXISTS orders' >/dev/null 2>&1
    if BACKUPY_DOCKER_SOCKET=$BACKUPY_TEST_DOCKER_SOCKET BACKUPY_RESTORE_PASSWORD=file:$cdir/secrets/pg_password.txt \
        "$bin" restore --config "$work/compose-host.toml" --identity "$cdir/backupy.key" \
        --backup latest --job app-nightly --to docker://app@app-postgres/app_restored \
        >"$work/restore.out" 2>"$work/restore.err"; then
        rows=$(pg_exec -d app_restored -c "SELECT count(*) || ':' || sum(length(item)) FROM orders" 2>/dev/null) || rows=
        [[ -n $rows ]] && break
    fi
    sleep 1
done
want=$(pg_exec -d app -c "SELECT count(*) || ':' || sum(length(item)) FROM orders")
[[ -n $rows && $rows == "$want" ]] || {
    cat "$work/restore.out" "$work/restore.err" >&2
    docker logs "$agent_id" >&2
    fail "no restorable app-nightly backup from the compose agent (restored: '${rows}', want '$want')"
}
echo "compose: app-nightly restored through docker://app-postgres: $rows (rows:bytes) as in the source" >&2

echo "image smoke: non-root (uid 10001), healthy, SQLite and Redis backed up to S3 and verified; compose example up, PostgreSQL backed up through DOCKER_EXEC and restored" >&2
