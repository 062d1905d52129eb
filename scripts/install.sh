#!/usr/bin/env bash
# Installs backupy-agent on a VM without Docker: the binary, a `backupy` system user, the
# hardened systemd unit and a commented configuration skeleton. Idempotent: a second run
# changes nothing, and an existing configuration or environment file is never touched.
#
#   sudo scripts/install.sh [--binary PATH] [--prefix /usr/local]
#   sudo scripts/install.sh --uninstall         # keeps /etc/backupy and /var/lib/backupy
#   DESTDIR=/tmp/pkgroot scripts/install.sh --prefix /usr   # for packaging: no user is
#                                                           # created, no systemctl runs
#
# Layout (prefix /usr/local):
#   /usr/local/lib/backupy/backupy-agent     the binary; its directory belongs to the
#                                            backupy user so that self-update can swap it
#   /usr/local/bin/backupy-agent             symlink to it
#   /usr/local/bin/backupy-decrypt           (when found beside the agent binary)
#   /etc/systemd/system/backupy-agent.service
#   /etc/sysusers.d/backupy.conf, /etc/tmpfiles.d/backupy.conf   user and directory
#                                            ownership, for systemd-sysusers/-tmpfiles
#   /etc/backupy/backupy.toml                configuration skeleton (root:backupy 0640)
#   /etc/backupy/backupy.env                 secrets for the unit (root 0600)
# State lives in /var/lib/backupy (the unit's StateDirectory=).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

prefix=/usr/local
binary=
uninstall=0
DESTDIR=${DESTDIR:-}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "install: $*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --binary) binary=${2:?--binary needs a file}; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --uninstall) uninstall=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ $prefix == /* ]] || die "--prefix must be absolute: $prefix"
prefix=${prefix%/}

live=0
[[ -z $DESTDIR ]] && live=1
if ((live)) && [[ $(id -u) -ne 0 ]]; then
    die "installing into / needs root (or set DESTDIR=… to install into a staging root)"
fi

libdir=$prefix/lib/backupy
unit=/etc/systemd/system/backupy-agent.service
root=${DESTDIR%/}

changed=0
note() { echo "install: $*"; changed=1; }

# Copies $1 to $2 with mode $3 unless the content and mode are already there.
put() {
    local src=$1 dst=$root$2 mode=$3
    if [[ -f $dst ]] && cmp -s "$src" "$dst" && [[ $(stat -c %a "$dst") == "$mode" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dst")"
    install -m "$mode" "$src" "$dst.tmp.$$"
    mv -f "$dst.tmp.$$" "$dst"
    note "installed $2"
}

# Writes stdin to $1 with mode $2 only when the file does not exist yet.
put_once() {
    local dst=$root$1 mode=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -e $dst ]]; then
        rm -f "$tmp"
        return 0
    fi
    mkdir -p "$(dirname "$dst")"
    install -m "$mode" "$tmp" "$dst"
    rm -f "$tmp"
    note "created $1"
}

link() {
    local target=$1 name=$root$2
    [[ -L $name && $(readlink "$name") == "$target" ]] && return 0
    mkdir -p "$(dirname "$name")"
    ln -sfn "$target" "$name"
    note "linked $2 -> $target"
}

remove() {
    local p
    for p in "$@"; do
        if [[ -e $root$p || -L $root$p ]]; then
            rm -f "$root$p"
            note "removed $p"
        fi
    done
}

systemctl_live() {
    if ((live)) && [[ -d /run/systemd/system ]]; then
        systemctl "$@"
    fi
}

if ((uninstall)); then
    systemctl_live disable --now backupy-agent.service || true
    remove "$unit" "$prefix/bin/backupy-agent" "$prefix/bin/backupy-decrypt" \
        "$libdir/backupy-agent" "$libdir/backupy-agent.previous" \
        /etc/sysusers.d/backupy.conf /etc/tmpfiles.d/backupy.conf
    if [[ -d $root$libdir ]]; then
        rm -rf "${root:?}$libdir"
        note "removed $libdir"
    fi
    systemctl_live daemon-reload
    echo "install: kept /etc/backupy (configuration, secrets) and /var/lib/backupy (state) and the backupy user; remove them by hand if you want them gone"
    ((changed)) || echo "install: nothing to remove"
    exit 0
fi

if [[ -z $binary ]]; then
    for candidate in "$here/dist/release/x86_64-unknown-linux-musl/backupy-agent" \
        "$here/target/x86_64-unknown-linux-musl/release/backupy-agent" \
        "$here/target/release/backupy-agent"; do
        if [[ -x $candidate ]]; then
            binary=$candidate
            break
        fi
    done
    [[ -n $binary ]] || die "no built binary found: run scripts/release.sh first, or pass --binary PATH"
fi
[[ -x $binary ]] || die "$binary is not an executable file"

put "$binary" "$libdir/backupy-agent" 755
link "$libdir/backupy-agent" "$prefix/bin/backupy-agent"
decrypt=$(dirname "$binary")/backupy-decrypt
[[ -x $decrypt ]] && put "$decrypt" "$prefix/bin/backupy-decrypt" 755

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s|/usr/local/|$prefix/|g" "$here/dist/backupy-agent.service" >"$tmp"
put "$tmp" "$unit" 644
printf 'u backupy - "Backupy backup agent" /var/lib/backupy /usr/sbin/nologin\n' >"$tmp"
put "$tmp" /etc/sysusers.d/backupy.conf 644
printf 'd %s 0755 backupy backupy -\nZ %s - backupy backupy -\n' "$libdir" "$libdir" >"$tmp"
put "$tmp" /etc/tmpfiles.d/backupy.conf 644

put_once /etc/backupy/backupy.toml 640 <<'TOML'
# backupy-agent standalone configuration (see `backupy-agent check-config --help`).
# Relative paths are relative to this file. Validate with:
#   backupy-agent check-config /etc/backupy/backupy.toml
state_dir = "/var/lib/backupy"

[storage]
# Exactly one of: a local directory, or [storage.s3].
dir = "/var/lib/backupy/backups"
# [storage.s3]
# endpoint = "https://s3.example.com"
# region = "us-east-1"
# bucket = "backups"
# prefix = "prod/"
# access_key_id = "env:S3_KEY"          # set S3_KEY and S3_SECRET in backupy.env
# secret_access_key = "env:S3_SECRET"

[encryption]
# The public key printed by `backupy-agent keygen --out /secure/place/backupy.key`.
# Keep the private key off this machine: it is needed only to restore.
recipient = "bkpy1-replace-me"

# [[targets]]
# id = "app-db"
# type = "postgresql"                   # postgresql | mysql | mariadb | mongodb | redis | sqlite
# url = "postgres://backup@127.0.0.1:5432/app"
# password = "env:APP_DB_PASSWORD"      # set APP_DB_PASSWORD in backupy.env

# [[jobs]]
# id = "app-nightly"
# target = "app-db"
# cron = "0 3 * * *"                    # UTC
# retention_days = 14
# keep_last = 3
TOML

put_once /etc/backupy/backupy.env 600 <<'ENV'
# Environment of backupy-agent.service (root only). Secrets referenced as env:NAME in
# backupy.toml go here, e.g.:
# APP_DB_PASSWORD=…
# S3_KEY=…
# S3_SECRET=…
# Connected mode instead of the TOML file (also remove --config from ExecStart with a
# drop-in: see docs/install.md, "systemd"):
# BACKUPY_SERVER_URL=wss://backupy.example.com
# BACKUPY_AGENT_KEY=…
ENV

if ((live)); then
    if ! getent passwd backupy >/dev/null; then
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers /etc/sysusers.d/backupy.conf
        else
            useradd --system --home-dir /var/lib/backupy --shell /usr/sbin/nologin backupy
        fi
        note "created the backupy user"
    fi
    if [[ $(stat -c %U "$libdir") != backupy ]]; then
        chown -R backupy:backupy "$libdir"
        note "gave $libdir to the backupy user (self-update swaps the binary there)"
    fi
    if [[ $(stat -c %G /etc/backupy/backupy.toml) != backupy ]]; then
        chgrp backupy /etc/backupy/backupy.toml
        note "made /etc/backupy/backupy.toml readable by the backupy group"
    fi
    ((changed)) && systemctl_live daemon-reload
fi

if ((changed)); then
    echo "install: done. Edit /etc/backupy/backupy.toml (and backupy.env), then:"
    echo "  $prefix/bin/backupy-agent check-config /etc/backupy/backupy.toml"
    echo "  systemctl enable --now backupy-agent"
else
    echo "install: already installed, nothing changed"
fi
