#!/usr/bin/env bash
# Benchmarks (not tests): throughput, CPU and peak RSS of the agent, side by side with
# the plain tools on the same bytes, in one run. Figures go to docs/performance.md.
#
#   scripts/bench.sh              # 1 GiB per pipeline run, RSS at 1 and 4 GiB
#   BENCH_SIZE=256MiB scripts/bench.sh
#   BENCH_SECTIONS="s3 pg" scripts/bench.sh     # pipeline | s3 | pg (default: all)
#   BENCH_AGENT=target/debug/backupy-agent BENCH_SECTIONS=pg scripts/bench.sh
#                                  # use a prebuilt agent (no release build); pg only
set -euo pipefail
cd "$(dirname "$0")/.."

size=${BENCH_SIZE:-1GiB}
sections=" ${BENCH_SECTIONS:-pipeline s3 pg} "
want() { [[ $sections == *" $1 "* ]]; }
big=${BENCH_BIG_SIZE:-4GiB}
scripts/install-deps.sh bench docker >/dev/null

B=target/release/examples/pipeline_bench
if [[ -n ${BENCH_AGENT:-} ]]; then
    AGENT=$(realpath "$BENCH_AGENT")
else
    echo "building (release)..." >&2
    cargo build --quiet --locked --release --example pipeline_bench --bins
    AGENT=$PWD/target/release/backupy-agent
fi
echo "# agent: $AGENT"

echo "# machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ), input: generated SQL-dump-like text"
if want pipeline; then
echo
echo "## pipeline: generated dump → compress → encrypt → SHA-256 → discard ($size)"
for c in zstd gzip none; do
    for e in v2 v1; do
        "$B" --size "$size" --compression "$c" --encryption "$e"
    done
done

echo
echo "## peak RSS as the dump grows (zstd, v2)"
"$B" --size "$size" --compression zstd --encryption v2
"$B" --size "$big" --compression zstd --encryption v2

fi

plain() {
    local label=$1
    shift
    local t0 t1
    t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S %M" -o /tmp/bench.time bash -c "$*"
    t1=$(date +%s.%N)
    read -r u s rss </tmp/bench.time
    awk -v l="$label" -v t0="$t0" -v t1="$t1" -v u="$u" -v s="$s" -v rss="$rss" -v size="$size" 'BEGIN {
        mib = size; sub(/GiB$/, "", mib); sub(/MiB$/, "", mib); if (size ~ /GiB$/) mib *= 1024;
        secs = t1 - t0;
        printf "tool=\"%s\" input_mib=%d seconds=%.2f mib_per_s=%.0f cpu_s=%.2f peak_rss_mib(largest process)=%.1f\n", l, mib, secs, mib / secs, u + s, rss / 1024 }'
}
if want pipeline; then
echo
echo "## plain tools on the same bytes (generator | tool > /dev/null; GNU time)"
plain "generator only" "$B --size $size --emit > /dev/null"
plain "zstd -3" "$B --size $size --emit | zstd -3 -T1 -q -c > /dev/null"
plain "zstd -3 | openssl aes-256-ctr" "$B --size $size --emit | zstd -3 -T1 -q -c | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench > /dev/null"
plain "gzip -6" "$B --size $size --emit | gzip -6 > /dev/null"
plain "openssl aes-256-ctr (no compression)" "$B --size $size --emit | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench > /dev/null"
fi

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_init
services_start_s3 >/dev/null
mkdir -p "$BACKUPY_TEST_S3_DIR/bench"
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other \
    RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="$BACKUPY_TEST_S3_ACCESS_KEY" \
    RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="$BACKUPY_TEST_S3_SECRET_KEY" \
    RCLONE_CONFIG_BENCH_ENDPOINT="$BACKUPY_TEST_S3_ENDPOINT" RCLONE_CONFIG_BENCH_REGION="$BACKUPY_TEST_S3_REGION"

if want s3; then
echo
echo "## S3 upload to the local S3 server (s3s-fs on loopback), side by side with rclone rcat ($size)"
"$B" --size "$size" --compression none --encryption none --s3 bench
rm -rf "${BACKUPY_TEST_S3_DIR:?}/bench/bench"
"$B" --size "$size" --compression zstd --encryption v2 --s3 bench
rm -rf "${BACKUPY_TEST_S3_DIR:?}/bench/bench"
plain "rclone rcat (16 MiB chunks, 4 streams)" "$B --size $size --emit | env -u AWS_CA_BUNDLE rclone rcat --s3-chunk-size 16M --s3-upload-concurrency 4 bench:bench/rclone-object"
plain "zstd -3 | env -u AWS_CA_BUNDLE rclone rcat" "$B --size $size --emit | zstd -3 -T1 -q -c | env -u AWS_CA_BUNDLE rclone rcat --s3-chunk-size 16M --s3-upload-concurrency 4 bench:bench/rclone-object2"
rm -rf "${BACKUPY_TEST_S3_DIR:?}/bench/"*
fi

if want pg; then
echo
scale=${BENCH_PGBENCH_SCALE:-50}
echo "## PostgreSQL: pgbench scale $scale, through the agent to S3 vs the plain tools"
services_start_postgres >/dev/null
export PGHOST=$BACKUPY_TEST_PG_HOST PGPORT=$BACKUPY_TEST_PG_PORT PGUSER=$BACKUPY_TEST_PG_USER PGPASSWORD=$BACKUPY_TEST_PG_PASSWORD
"$BACKUPY_TEST_PG_BIN/createdb" bench
"$BACKUPY_TEST_PG_BIN/pgbench" -i -q -s "$scale" bench >/dev/null 2>&1
# Throughput below is database size / wall time.
size="$("$BACKUPY_TEST_PG_BIN/psql" -Atc "select pg_database_size('bench') / 1048576" bench)MiB"
echo "# database size: $size"
work=$(mktemp -d)
"$AGENT" keygen --out "$work/backupy.key" >"$work/backupy.pub" 2>/dev/null
cat >"$work/bench.toml" <<TOML
state_dir = "$work/state"
[storage.s3]
endpoint = "$BACKUPY_TEST_S3_ENDPOINT"
region = "$BACKUPY_TEST_S3_REGION"
bucket = "bench"
access_key_id = "env:BACKUPY_TEST_S3_ACCESS_KEY"
secret_access_key = "env:BACKUPY_TEST_S3_SECRET_KEY"
[encryption]
recipient = "file:$work/backupy.pub"
[[targets]]
id = "pgbench"
type = "postgresql"
url = "postgres://$PGUSER@$PGHOST:$PGPORT/bench"
password = "env:PGPASSWORD"
[[jobs]]
id = "bench"
target = "pgbench"
compression = "zstd"
TOML
PGD=$BACKUPY_TEST_PG_BIN/pg_dump
plain "pg_dump -Fc > /dev/null" "$PGD -Fc bench > /dev/null"
plain "agent: pg_dump -Fc -Z0 → zstd → v2 → S3 multipart" "BACKUPY_LOG_LEVEL=warn $AGENT backup --config $work/bench.toml > /dev/null"
plain "pg_dump -Fc -Z0 | zstd -3 | openssl aes-256-ctr | env -u AWS_CA_BUNDLE rclone rcat" "$PGD -Fc -Z0 bench | zstd -3 -T1 -q -c | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench | env -u AWS_CA_BUNDLE rclone rcat --s3-chunk-size 16M --s3-upload-concurrency 4 bench:bench/pg-rclone"

# DOCKER_EXEC: the same database dumped by the pg_dump inside a container (an image
# FROM scratch with the host's binaries mounted, on the host network), streamed out
# through the Engine API. pg_dump then runs under containerd, outside the agent's
# process tree: its CPU is read from the container's cgroup, and the CPU that dockerd
# and containerd spend relaying the stream from /proc, and added.
services_start_dockerd >/dev/null
tag="postgres:$("$PGD" --version | awk '{print $3}' | cut -d. -f1)"
mkdir -p "$work/image"
printf 'FROM scratch\nENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' >"$work/image/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$work/image" >/dev/null 2>&1
cid=$(docker run -d --network host -v /usr:/usr:ro -v /lib:/lib:ro -v /lib64:/lib64:ro \
    -v /bin:/bin:ro -v /etc:/etc:ro --name bench-pg "$tag" sleep 86400)
sed -e 's/^id = "pgbench"$/id = "pgbench-docker"/' -e 's/^target = "pgbench"$/target = "pgbench-docker"/' \
    -e 's|^url = .*|strategy = "docker_exec"\ncontainer = "bench-pg"\nhost = "'"$PGHOST"'"\nport = '"$PGPORT"'\nusername = "'"$PGUSER"'"\ndatabase = "bench"|' \
    "$work/bench.toml" >"$work/bench-docker.toml"
ticks() { # utime + stime of the given pids, in seconds
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
dockerd_pid=$(cat "$BACKUPY_TEST_TMP/dockerd/docker.pid")
containerd_pid=$(ps -o pid= --ppid "$dockerd_pid" | head -n1 | tr -d ' ')
cg=/sys/fs/cgroup/cpuacct/docker/$cid/cpuacct.usage
[[ -r $cg ]] || cg=/sys/fs/cgroup/docker/$cid/cpu.stat
cg_cpu() { if [[ $cg == */cpu.stat ]]; then awk '/^usage_usec/ {printf "%.2f", $2 / 1e6}' "$cg"; else awk '{printf "%.2f", $1 / 1e9}' "$cg"; fi; }
d0=$(ticks "$dockerd_pid" "$containerd_pid") c0=$(cg_cpu)
plain "agent DOCKER_EXEC: pg_dump -Fc -Z0 in a container → zstd → v2 → S3 multipart" "BACKUPY_LOG_LEVEL=warn BACKUPY_DOCKER_SOCKET=$BACKUPY_TEST_DOCKER_SOCKET $AGENT backup --config $work/bench-docker.toml > /dev/null"
d1=$(ticks "$dockerd_pid" "$containerd_pid") c1=$(cg_cpu)
awk -v c="$(awk -v a="$c0" -v b="$c1" 'BEGIN{print b - a}')" -v d="$(awk -v a="$d0" -v b="$d1" 'BEGIN{print b - a}')" \
    'BEGIN { printf "  + outside the agent: pg_dump in the container cpu_s=%.2f, dockerd+containerd relaying cpu_s=%.2f\n", c, d }'
docker rm -f bench-pg >/dev/null
rm -rf "$work"
fi
