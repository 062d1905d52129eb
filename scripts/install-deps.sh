#!/usr/bin/env bash
# Install, on a fresh Debian 12 machine, what the test suite and the benchmarks need —
# only what is missing. Quiet unless something fails; idempotent; well under 2 s when
# everything is already present.
#
# Usage: scripts/install-deps.sh [GROUP...]      (default: all)
#   core    sqlite3, zstd, openssl, socat, prometheus (promtool), curl, PostgreSQL 15 (+contrib), MariaDB server and
#           client, Redis; cargo-nextest
#   s3      the s3s-fs S3 server (cargo install into ~/.cargo/bin), and moto_server
#           (Object Lock) in the test venv
#   mongo   a Python venv with SecantusDB + pymongo (MongoDB wire-protocol server)
#   docker  Debian's docker.io (dockerd; started by scripts/services.sh, never as a
#           system service)
#   bench   rclone, zstd, openssl, GNU time, pgbench (shipped by postgresql-15)
#   lint    shellcheck
#   stress  stress-ng (scripts/stress-tests.sh keeps a core busy with it)
#   ship    the static build and packaging checks: the x86_64-unknown-linux-musl Rust
#           target, musl-tools, binutils (readelf), docker.io (dockerd for the image
#           smoke test), docker-compose, systemd (systemd-analyze)
#   all     every group above
#
# Environment:
#   BACKUPY_TEST_CACHE  cache dir (default ${XDG_CACHE_HOME:-~/.cache}/backupy-test)
#   BACKUPY_TEST_VENV   SecantusDB venv (default $BACKUPY_TEST_CACHE/venv)
#   S3S_FS_VERSION      s3s-fs version to install (default 0.14.1)
#   SECANTUSDB_VERSION  SecantusDB version (default 0.7.0b3)
#
# Apt packages are installed with service start-up denied (policy-rc.d): the tests run
# their own throwaway instances (scripts/services.sh), and a system dockerd would create
# a bridge network and iptables rules.
set -euo pipefail

CACHE_DIR=${BACKUPY_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/backupy-test}
VENV=${BACKUPY_TEST_VENV:-$CACHE_DIR/venv}
S3S_FS_VERSION=${S3S_FS_VERSION:-0.14.1}
SECANTUSDB_VERSION=${SECANTUSDB_VERSION:-0.7.0b3}
# moto_server: the S3 server of the Object Lock tests (s3s-fs has no Object Lock).
MOTO_VERSION=${MOTO_VERSION:-5.2.1}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export DEBIAN_FRONTEND=noninteractive
export PATH="$CARGO_BIN:$PATH"

LOG=$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX")
trap 'rm -f "$LOG"' EXIT

die() {
    echo "install-deps: $*" >&2
    if [[ -s $LOG ]]; then
        echo "---- output ----" >&2
        tail -n 60 "$LOG" >&2
    fi
    exit 1
}

# Run a command with its output going to the log; show the log if it fails.
quiet() {
    "$@" >>"$LOG" 2>&1 || die "failed: $*"
}

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install packages"
    SUDO=(sudo)
fi

# ---------------------------------------------------------------------------- groups
declare -a APT_WANT=()
want_core=0 want_s3=0 want_mongo=0 want_docker=0 want_bench=0 want_lint=0 want_ship=0 want_stress=0

select_group() {
    case $1 in
        core) want_core=1 ;;
        s3) want_s3=1 ;;
        mongo) want_mongo=1 ;;
        docker) want_docker=1 ;;
        bench) want_bench=1 ;;
        lint) want_lint=1 ;;
        ship) want_ship=1 ;;
        stress) want_stress=1 ;;
        all) want_core=1 want_s3=1 want_mongo=1 want_docker=1 want_bench=1 want_lint=1 want_ship=1 want_stress=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown group '$1' (core, s3, mongo, docker, bench, lint, ship, stress, all)" ;;
    esac
}

if [[ $# -eq 0 ]]; then
    select_group all
else
    for g in "$@"; do select_group "$g"; done
fi

# pgbench lives in postgresql-15 (the server package); postgresql-contrib is a
# metapackage kept for completeness (pg_stat_statements & co.).
((want_core)) && APT_WANT+=(sqlite3 zstd openssl socat prometheus curl ca-certificates procps python3
    postgresql postgresql-contrib postgresql-client mariadb-server mariadb-client
    redis-server redis-tools)
((want_s3)) && APT_WANT+=(curl build-essential pkg-config)
((want_mongo || want_s3)) && APT_WANT+=(python3 python3-venv)
((want_docker)) && APT_WANT+=(docker.io)
((want_bench)) && APT_WANT+=(rclone zstd openssl time postgresql postgresql-client)
((want_lint)) && APT_WANT+=(shellcheck)
((want_stress)) && APT_WANT+=(stress-ng)
((want_ship)) && APT_WANT+=(musl-tools binutils docker.io docker-compose systemd openssl ca-certificates)

# ------------------------------------------------------------------------------ apt
apt_missing() {
    local -A seen=()
    local p status
    local -a uniq=()
    for p in "${APT_WANT[@]}"; do
        [[ -n ${seen[$p]:-} ]] && continue
        seen[$p]=1
        uniq+=("$p")
    done
    for p in "${uniq[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $status == ii* ]] || echo "$p"
    done
}

install_apt() {
    local -a missing
    mapfile -t missing < <(apt_missing)
    ((${#missing[@]})) || return 0
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        "${SUDO[@]}" apt-get update -q &&
            "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >>"$LOG" 2>&1 || rc=$?
    if ((created_policy)); then "${SUDO[@]}" rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------------------- cargo
need_cargo() {
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup first)"
}

install_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    need_cargo
    quiet nice -n 10 cargo install --locked cargo-nextest
}

install_s3s() {
    local bin
    bin=$(command -v s3s-fs || true)
    if [[ -n $bin ]] && "$bin" --version 2>/dev/null | grep -qF "$S3S_FS_VERSION"; then
        return 0
    fi
    need_cargo
    quiet nice -n 10 cargo install --locked s3s-fs --version "$S3S_FS_VERSION" \
        --features binary --root "${CARGO_HOME:-$HOME/.cargo}"
}

# ----------------------------------------------------------------------------- venv
install_venv() {
    local stamp="$VENV/.backupy-secantusdb-$SECANTUSDB_VERSION-moto-$MOTO_VERSION"
    if [[ -e $stamp && -x $VENV/bin/python ]]; then
        return 0
    fi
    local py
    py=$(command -v python3) || die "python3 not found"
    if [[ ! -x $VENV/bin/python ]]; then
        mkdir -p "$(dirname "$VENV")"
        quiet "$py" -m venv "$VENV"
    fi
    quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "secantusdb==$SECANTUSDB_VERSION" pymongo "moto[server]==$MOTO_VERSION"
    quiet "$VENV/bin/python" -c 'import secantus.cli, pymongo, moto'
    touch "$stamp"
}

install_musl_target() {
    need_cargo
    rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl && return 0
    quiet rustup target add x86_64-unknown-linux-musl
}

install_apt
((want_ship)) && install_musl_target
((want_core)) && install_nextest
((want_s3)) && install_s3s
# The venv also holds moto_server, which the S3 Object Lock tests use.
((want_mongo || want_s3)) && install_venv
exit 0
