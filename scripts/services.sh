# shellcheck shell=bash
# Throwaway test services on free loopback ports, all inside one temp dir.
#
# Source it, don't run it:
#
#     source scripts/services.sh
#     services_init                 # temp dir + EXIT trap that stops everything
#     services_start_postgres       # each start function is idempotent
#     services_start_redis
#     ...                           # run the tests: they read the BACKUPY_TEST_* vars
#     services_stop_all             # optional: the EXIT trap does it anyway
#
# Functions and what they export (every service also writes its variables to
# $BACKUPY_TEST_TMP/<service>/env as `export K=V` lines, and logs to
# $BACKUPY_TEST_TMP/<service>/*.log):
#
#   services_init             BACKUPY_TEST_TMP
#   services_stop_all         stops every service (reverse start order), kills anything
#                             left running from the temp dir, removes the temp dir and
#                             unsets the variables below; idempotent
#   services_free_port        prints a free TCP port on 127.0.0.1 (asks the kernel)
#   services_start_postgres   BACKUPY_TEST_PG_HOST=127.0.0.1 BACKUPY_TEST_PG_PORT
#                             BACKUPY_TEST_PG_USER=postgres BACKUPY_TEST_PG_PASSWORD
#                             BACKUPY_TEST_PG_SOCKET_DIR BACKUPY_TEST_PG_BIN
#   services_start_postgres_tls a second PostgreSQL with ssl=on and hostssl-only rules
#                             (plaintext refused; user `certuser` by client certificate):
#                             BACKUPY_TEST_PGTLS_PORT BACKUPY_TEST_PGTLS_PASSWORD (postgres)
#                             BACKUPY_TEST_PGTLS_DIR (ca.pem ca.key: the test CA; server cert
#                             for IP 127.0.0.1 only; client.pem client.key client-enc.key
#                             for CN=certuser, the last encrypted with the password in
#                             client-enc.pass)
#   services_start_mariadb    BACKUPY_TEST_MARIADB_HOST=127.0.0.1 BACKUPY_TEST_MARIADB_PORT
#                             BACKUPY_TEST_MARIADB_USER=root BACKUPY_TEST_MARIADB_PASSWORD
#                             BACKUPY_TEST_MARIADB_SOCKET
#   services_start_mariadb_tls a second MariaDB with TLS and require_secure_transport (TCP
#                             without TLS refused): BACKUPY_TEST_MARIADBTLS_PORT
#                             BACKUPY_TEST_MARIADBTLS_PASSWORD (root)
#                             BACKUPY_TEST_MARIADBTLS_SOCKET BACKUPY_TEST_MARIADBTLS_DIR (the
#                             files _svc_make_tls_certs makes); user `certuser` (no password,
#                             REQUIRE SUBJECT '/CN=certuser')
#   services_start_redis      BACKUPY_TEST_REDIS_HOST=127.0.0.1 BACKUPY_TEST_REDIS_PORT
#                             BACKUPY_TEST_REDIS_PASSWORD (the `default` user's)
#                             BACKUPY_TEST_REDIS_ACL_USER=backupy BACKUPY_TEST_REDIS_ACL_PASSWORD
#                             BACKUPY_TEST_REDIS_SERVER (path of redis-server)
#   services_start_redis_tls  a second Redis with --port 0 and a TLS port that requires a
#                             client certificate: BACKUPY_TEST_REDISTLS_PORT
#                             BACKUPY_TEST_REDISTLS_PASSWORD (the `default` user's)
#                             BACKUPY_TEST_REDISTLS_ACL_USER=backupy BACKUPY_TEST_REDISTLS_ACL_PASSWORD
#                             BACKUPY_TEST_REDISTLS_DIR (ca.pem, client.pem, client.key:
#                             the files _svc_make_tls_certs makes; server cert for 127.0.0.1)
#   services_start_s3         BACKUPY_TEST_S3_ENDPOINT=http://127.0.0.1:PORT
#                             BACKUPY_TEST_S3_ACCESS_KEY BACKUPY_TEST_S3_SECRET_KEY
#                             BACKUPY_TEST_S3_REGION=us-east-1 BACKUPY_TEST_S3_DIR
#   services_start_mongo      BACKUPY_TEST_SECANTUS_URL (mongodb://USER:PW@127.0.0.1:PORT/
#                             ?directConnection=true&authSource=admin)
#                             BACKUPY_TEST_SECANTUS_HOST BACKUPY_TEST_SECANTUS_PORT
#                             BACKUPY_TEST_SECANTUS_USER BACKUPY_TEST_SECANTUS_PASSWORD
#                             BACKUPY_TEST_SECANTUS_PYTHON (the venv's python, has pymongo)
#   services_start_dockerd    BACKUPY_TEST_DOCKER_SOCKET (path) DOCKER_HOST=unix://PATH
#   services_start_all        all of the above (stops at the first failure)
#
# Knobs (environment):
#   BACKUPY_TEST_SERVICE_TIMEOUT  seconds to wait for a service to answer (default 60)
#   BACKUPY_TEST_KEEP=1           keep the temp dir (logs) after stopping everything
#   BACKUPY_TEST_CACHE            cache dir (default ${XDG_CACHE_HOME:-~/.cache}/backupy-test)
#   BACKUPY_TEST_VENV             SecantusDB venv (default $BACKUPY_TEST_CACHE/venv)
#   BACKUPY_TEST_S3S_FS           s3s-fs binary (default: on PATH, else ~/.cargo/bin)
#   BACKUPY_TEST_PG_VERSION       PostgreSQL major under /usr/lib/postgresql (default: newest)
#
# Missing programs are reported with the command that installs them
# (scripts/install-deps.sh GROUP).
#
# Notes:
# - services_init installs traps: EXIT runs services_stop_all; INT, TERM and HUP exit the
#   shell (130/143/129) so that the EXIT trap runs. A caller with its own EXIT trap
#   should call services_stop_all from it instead.
# - The functions export into the shell that calls them: don't call them inside $(...)
#   or ( ... ). A subshell that calls a start function without having called
#   services_init itself gets its own temp dir, stopped when that subshell exits.
# - Each service runs in its own session (setsid); its pid is in <service>/pid. Stopping
#   sends the service's shutdown signal, waits, then SIGKILLs its process group; a final
#   sweep kills any process whose command line names the temp dir (e.g. containerd and
#   its shims started by dockerd, or a test's agent given a config file there).
# - Ports come from the kernel (bind to 127.0.0.1:0, then release): another process
#   could grab one in between; that shows as a start failure naming the log.

# ------------------------------------------------------------------------ helpers

_services_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

_svc_err() {
    echo "services: $*" >&2
}

# Random lowercase hex secret (URL-, shell- and config-safe).
_svc_secret() {
    od -An -tx1 -N"${1:-16}" /dev/urandom | tr -d ' \n'
}

_svc_install_hint() {
    echo "run: $_services_here/install-deps.sh $1"
}

_svc_need() { # _svc_need GROUP PROGRAM...
    local group=$1 p
    shift
    for p in "$@"; do
        if ! command -v "$p" >/dev/null 2>&1 && [[ ! -x $p ]]; then
            _svc_err "$p not found ($(_svc_install_hint "$group"))"
            return 1
        fi
    done
}

services_free_port() {
    local port tries=0
    while :; do
        port=$(python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || {
            _svc_err "python3 is needed to find a free port"
            return 1
        }
        # Never hand out the same port twice in one temp dir.
        if [[ -n ${BACKUPY_TEST_TMP:-} && -d $BACKUPY_TEST_TMP ]]; then
            if grep -qx "$port" "$BACKUPY_TEST_TMP/.ports" 2>/dev/null && ((++tries < 20)); then
                continue
            fi
            echo "$port" >>"$BACKUPY_TEST_TMP/.ports"
        fi
        echo "$port"
        return 0
    done
}

# A process counts as alive while it exists and is not a zombie.
_svc_alive() {
    local pid=$1 stat
    [[ -n $pid ]] || return 1
    { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

_svc_tcp_open() { # _svc_tcp_open PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Record and export a variable for a service: `_svc_export NAME VAR VALUE`.
_svc_export() {
    local name=$1 var=$2 value=$3
    export "$var=$value"
    printf 'export %s=%q\n' "$var" "$value" >>"$BACKUPY_TEST_TMP/$name/env"
}

# True (and re-exports the service's variables) when NAME is already running here.
_svc_running() {
    local name=$1 dir pid
    [[ ${_services_owner:-} == "$BASHPID" ]] || return 1
    dir=$BACKUPY_TEST_TMP/$name
    [[ -f $dir/ready && -f $dir/pid ]] || return 1
    pid=$(<"$dir/pid")
    _svc_alive "$pid" || return 1
    # shellcheck disable=SC1091
    source "$dir/env"
}

# Make (or remake) the directory of a service; refuse if it is still running.
_svc_prepare() {
    local name=$1 dir
    [[ ${_services_owner:-} == "$BASHPID" ]] || services_init || return 1
    dir=$BACKUPY_TEST_TMP/$name
    if [[ -f $dir/pid ]] && _svc_alive "$(<"$dir/pid")"; then
        _svc_stop "$name"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    grep -qx "$name" "$BACKUPY_TEST_TMP/.services" 2>/dev/null ||
        echo "$name" >>"$BACKUPY_TEST_TMP/.services"
}

# Start a program in its own session, in the background, output to LOG.
# _svc_spawn NAME LOG STOP_SIGNAL COMMAND...   (pid written to $dir/pid)
_svc_spawn() {
    local name=$1 log=$2 sig=$3 dir
    shift 3
    dir=$BACKUPY_TEST_TMP/$name
    echo "$sig" >"$dir/signal"
    rm -f "$dir/pid"
    # The inner shell writes its own pid (the process the command execs into) so the
    # pid is right whether or not setsid had to fork.
    # shellcheck disable=SC2016
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/pid" "$@" \
        </dev/null >>"$log" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/pid ]] && break
        sleep 0.02
    done
    disown $! 2>/dev/null || true
    [[ -s $dir/pid ]] || {
        _svc_err "$name: could not start $1 (log: $log)"
        return 1
    }
}

# _svc_fail NAME LOG MESSAGE: report with the end of the log, stop the service.
_svc_fail() {
    local name=$1 log=$2
    shift 2
    _svc_err "$name: $* (log: $log; BACKUPY_TEST_KEEP=1 keeps the temp dir)"
    if [[ -s $log ]]; then
        echo "---- last lines of $log ----" >&2
        tail -n 25 "$log" >&2
        echo "----" >&2
    fi
    _svc_stop "$name"
    return 1
}

# Wait until CHECK... succeeds, the service died, or the timeout passed.
# _svc_wait NAME LOG CHECK...
_svc_wait() {
    local name=$1 log=$2 pid deadline
    shift 2
    pid=$(<"$BACKUPY_TEST_TMP/$name/pid")
    deadline=$((SECONDS + ${BACKUPY_TEST_SERVICE_TIMEOUT:-60}))
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if ! _svc_alive "$pid"; then
            _svc_fail "$name" "$log" "exited before answering"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            _svc_fail "$name" "$log" "did not answer within ${BACKUPY_TEST_SERVICE_TIMEOUT:-60} s"
            return 1
        fi
        sleep 0.1
    done
}

# Stop one service: its shutdown signal, up to 30 s (dockerd: 60 s), then SIGKILL of its
# whole process group. Never fails.
_svc_stop() {
    local name=$1 dir pid sig i limit=300
    dir=$BACKUPY_TEST_TMP/$name
    [[ -f $dir/pid ]] || return 0
    pid=$(<"$dir/pid")
    sig=$(<"$dir/signal") 2>/dev/null || sig=TERM
    [[ $name == dockerd ]] && limit=600
    if [[ $pid =~ ^[0-9]+$ ]] && _svc_alive "$pid"; then
        if declare -F "_svc_prestop_$name" >/dev/null; then "_svc_prestop_$name"; fi
        kill -s "$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < limit; i++)); do
            _svc_alive "$pid" || break
            sleep 0.1
        done
        if _svc_alive "$pid"; then
            _svc_err "$name (pid $pid) ignored SIG$sig for $((limit / 10)) s: killing it"
        fi
    fi
    # The session leader may be gone while children remain in its process group.
    if [[ $pid =~ ^[0-9]+$ ]]; then kill -s KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$dir/pid" "$dir/ready"
    return 0
}

# pids (other than this shell and its ancestors) whose command line names the temp dir
_svc_leftovers() {
    local tmp=$1 p ppid k v
    local -A mine=()
    p=$BASHPID
    while [[ -n $p && $p != 0 ]]; do
        mine[$p]=1
        ppid=
        while read -r k v; do
            [[ $k == PPid: ]] && ppid=$v && break
        done 2>/dev/null <"/proc/$p/status"
        p=$ppid
    done
    local -a hits=()
    # The first line is the pid of the grep itself (its command line names $tmp too).
    mapfile -t hits < <(echo "$BASHPID" && exec grep -lsaF -- "$tmp" /proc/[0-9]*/cmdline)
    mine[${hits[0]:-0}]=1
    for p in "${hits[@]:1}"; do
        p=${p#/proc/}
        p=${p%/cmdline}
        [[ -n ${mine[$p]:-} ]] && continue
        _svc_alive "$p" && echo "$p"
    done
    return 0
}

# ------------------------------------------------------------------ init / stop

services_init() {
    if [[ ${_services_owner:-} == "$BASHPID" && -d ${BACKUPY_TEST_TMP:-} ]]; then
        return 0
    fi
    local base=${TMPDIR:-/tmp}
    # Unix socket paths are limited to 107 bytes: keep the root short.
    ((${#base} > 40)) && base=/tmp
    BACKUPY_TEST_TMP=$(mktemp -d "$base/backupy-test.XXXXXX") || {
        _svc_err "mktemp -d failed in $base"
        return 1
    }
    # Services running as other users (postgres, mysql) must traverse it.
    chmod 711 "$BACKUPY_TEST_TMP"
    : >"$BACKUPY_TEST_TMP/.services"
    export BACKUPY_TEST_TMP
    _services_owner=$BASHPID
    trap services_stop_all EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

services_stop_all() {
    local -
    set +e
    local tmp=${BACKUPY_TEST_TMP:-} name i pids
    [[ ${_services_owner:-} == "$BASHPID" && -n $tmp && -d $tmp ]] || return 0
    local -a names=()
    [[ -f $tmp/.services ]] && mapfile -t names <"$tmp/.services"
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do
        [[ -n ${names[i]} ]] && _svc_stop "${names[i]}"
    done
    # Anything still running from the temp dir: TERM, a moment, then KILL.
    pids=$(_svc_leftovers "$tmp")
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086
        kill -s TERM $pids 2>/dev/null
        for ((i = 0; i < 50; i++)); do
            pids=$(_svc_leftovers "$tmp")
            [[ -z $pids ]] && break
            sleep 0.1
        done
        # shellcheck disable=SC2086
        [[ -n $pids ]] && kill -s KILL $pids 2>/dev/null
    fi
    # dockerd may leave mounts (overlay, netns) under its data/exec roots.
    if grep -qF " $tmp/" /proc/mounts 2>/dev/null; then
        awk -v t="$tmp/" 'index($2, t) == 1 {print $2}' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null; done
    fi
    # Forget the variables of the services that are gone.
    local line var
    for name in "${names[@]}"; do
        [[ -f $tmp/$name/env ]] || continue
        while read -r line; do
            var=${line#export }
            var=${var%%=*}
            [[ $var =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && unset "$var"
        done <"$tmp/$name/env"
    done
    unset BACKUPY_TEST_TMP
    if [[ ${BACKUPY_TEST_KEEP:-0} == 1 ]]; then
        echo "services: kept $tmp" >&2
    else
        rm -rf "$tmp" 2>/dev/null || rm -rf "$tmp"
    fi
    unset _services_owner
    return 0
}

# -------------------------------------------------------------------- PostgreSQL

_svc_pg_bindir() {
    local d
    if [[ -n ${BACKUPY_TEST_PG_VERSION:-} ]]; then
        d=/usr/lib/postgresql/$BACKUPY_TEST_PG_VERSION/bin
    else
        d=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null |
            sort -V | tail -n 1)
        d=${d%/initdb}
    fi
    [[ -n $d && -x $d/initdb && -x $d/postgres ]] || {
        _svc_err "PostgreSQL server binaries not found under /usr/lib/postgresql ($(_svc_install_hint core))"
        return 1
    }
    echo "$d"
}

_svc_pg_check() {
    PGPASSWORD=$1 PGCONNECT_TIMEOUT=2 "$2/psql" -X -w -h 127.0.0.1 -p "$3" -U postgres \
        -d postgres -Atqc 'select 1'
}

services_start_postgres() {
    _svc_running postgres && return 0
    local bin
    bin=$(_svc_pg_bindir) || return 1
    _svc_prepare postgres || return 1
    local dir=$BACKUPY_TEST_TMP/postgres port pw log
    local data=$dir/data
    log=$dir/postgres.log
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    # initdb refuses root: run the server as `postgres` on a dir that user owns.
    local -a as_user=()
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || {
            _svc_err "postgres: running as root but there is no 'postgres' user ($(_svc_install_hint core))"
            return 1
        }
        as_user=(setpriv --reuid=postgres --regid=postgres --init-groups --)
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    (umask 077 && printf '%s\n' "$pw" >"$dir/pwfile")
    [[ ${#as_user[@]} -gt 0 ]] && chown postgres: "$dir/pwfile"
    if ! (cd "$dir" && "${as_user[@]}" "$bin/initdb" -D "$data" -U postgres \
        --auth=scram-sha-256 --pwfile="$dir/pwfile" -E UTF8 --locale=C.UTF-8 \
        --no-sync) >"$dir/initdb.log" 2>&1; then
        _svc_fail postgres "$dir/initdb.log" "initdb failed"
        return 1
    fi
    rm -f "$dir/pwfile"
    # Throwaway instance: durability off for speed; socket in the data dir.
    (cd "$dir" && _svc_spawn postgres "$log" INT "${as_user[@]}" "$bin/postgres" -D "$data" \
        -p "$port" -k "$data" -c listen_addresses=127.0.0.1 -c fsync=off \
        -c synchronous_commit=off -c full_page_writes=off) || return 1
    [[ ${#as_user[@]} -gt 0 ]] && chown postgres: "$log"
    _svc_wait postgres "$log" _svc_pg_check "$pw" "$bin" "$port" || return 1
    _svc_export postgres BACKUPY_TEST_PG_HOST 127.0.0.1
    _svc_export postgres BACKUPY_TEST_PG_PORT "$port"
    _svc_export postgres BACKUPY_TEST_PG_USER postgres
    _svc_export postgres BACKUPY_TEST_PG_PASSWORD "$pw"
    _svc_export postgres BACKUPY_TEST_PG_SOCKET_DIR "$data"
    _svc_export postgres BACKUPY_TEST_PG_BIN "$bin"
    touch "$dir/ready"
}

_svc_pg_tls_check() {
    PGPASSWORD=$1 PGCONNECT_TIMEOUT=2 PGSSLMODE=require "$2/psql" -X -w -h 127.0.0.1 -p "$3" \
        -U postgres -d postgres -Atqc 'select 1'
}

# A test CA, a server certificate for IP 127.0.0.1 (no DNS name: "localhost" is a wrong
# name on purpose) and a client certificate for CN=certuser, in $1.
_svc_make_tls_certs() {
    local d=$1
    (
        cd "$d" &&
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
                -subj /CN=backupy-services-ca &&
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
                -subj /CN=127.0.0.1 &&
            printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >server.ext &&
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -out server.pem -days 2 -extfile server.ext &&
            openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr \
                -subj /CN=certuser &&
            printf 'basicConstraints=CA:FALSE\n' >client.ext &&
            openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -out client.pem -days 2 -extfile client.ext &&
            _svc_secret 12 >client-enc.pass &&
            openssl pkey -in client.key -aes256 -passout file:client-enc.pass -out client-enc.key &&
            chmod 600 ./*.key client-enc.pass
    ) >"$d/openssl.log" 2>&1
}

services_start_postgres_tls() {
    _svc_running postgres_tls && return 0
    _svc_need core openssl || return 1
    local bin
    bin=$(_svc_pg_bindir) || return 1
    _svc_prepare postgres_tls || return 1
    local dir=$BACKUPY_TEST_TMP/postgres_tls port pw log
    local data=$dir/data tls=$dir/tls
    log=$dir/postgres.log
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    mkdir -p "$tls"
    _svc_make_tls_certs "$tls" || {
        _svc_fail postgres_tls "$tls/openssl.log" "cannot make the test certificates"
        return 1
    }
    local -a as_user=()
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || {
            _svc_err "postgres_tls: running as root but there is no 'postgres' user ($(_svc_install_hint core))"
            return 1
        }
        as_user=(setpriv --reuid=postgres --regid=postgres --init-groups --)
        chown postgres: "$dir"
    fi
    chmod 755 "$tls"
    chmod 700 "$dir"
    # The server reads its own copies; the test CA's files stay the caller's.
    cp "$tls/server.pem" "$tls/server.key" "$tls/ca.pem" "$dir/"
    (umask 077 && printf '%s\n' "$pw" >"$dir/pwfile")
    [[ ${#as_user[@]} -gt 0 ]] && chown postgres: "$dir/pwfile" "$dir/server.pem" "$dir/server.key" "$dir/ca.pem"
    chmod 600 "$dir/server.key"
    if ! (cd "$dir" && "${as_user[@]}" "$bin/initdb" -D "$data" -U postgres \
        --auth=scram-sha-256 --pwfile="$dir/pwfile" -E UTF8 --locale=C.UTF-8 \
        --no-sync) >"$dir/initdb.log" 2>&1; then
        _svc_fail postgres_tls "$dir/initdb.log" "initdb failed"
        return 1
    fi
    rm -f "$dir/pwfile"
    # hostssl only: a plaintext connection finds no rule and is refused.
    cat >"$data/pg_hba.conf" <<EOF
local   all all                     scram-sha-256
hostssl all certuser 127.0.0.1/32   cert
hostssl all all      127.0.0.1/32   scram-sha-256
EOF
    [[ ${#as_user[@]} -gt 0 ]] && chown postgres: "$data/pg_hba.conf"
    (cd "$dir" && _svc_spawn postgres_tls "$log" INT "${as_user[@]}" "$bin/postgres" -D "$data" \
        -p "$port" -k "$data" -c listen_addresses=127.0.0.1 -c fsync=off \
        -c synchronous_commit=off -c full_page_writes=off -c ssl=on \
        -c ssl_cert_file="$dir/server.pem" -c ssl_key_file="$dir/server.key" \
        -c ssl_ca_file="$dir/ca.pem") || return 1
    [[ ${#as_user[@]} -gt 0 ]] && chown postgres: "$log"
    _svc_wait postgres_tls "$log" _svc_pg_tls_check "$pw" "$bin" "$port" || return 1
    PGPASSWORD=$pw PGSSLMODE=require "$bin/psql" -X -w -h 127.0.0.1 -p "$port" -U postgres \
        -d postgres -Atqc 'CREATE ROLE certuser LOGIN SUPERUSER' >>"$log" 2>&1 || {
        _svc_fail postgres_tls "$log" "cannot create the role certuser"
        return 1
    }
    _svc_export postgres_tls BACKUPY_TEST_PGTLS_PORT "$port"
    _svc_export postgres_tls BACKUPY_TEST_PGTLS_PASSWORD "$pw"
    _svc_export postgres_tls BACKUPY_TEST_PGTLS_DIR "$tls"
    touch "$dir/ready"
}

# ----------------------------------------------------------------------- MariaDB

services_start_mariadb() {
    _svc_running mariadb && return 0
    _svc_need core mariadb-install-db mariadbd mariadb || return 1
    _svc_prepare mariadb || return 1
    local dir=$BACKUPY_TEST_TMP/mariadb port pw log user
    local sock=$dir/mysqld.sock
    log=$dir/mariadbd.log
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    user=$(id -un)
    if [[ $(id -u) -eq 0 ]]; then
        if id mysql >/dev/null 2>&1; then user=mysql; else user=root; fi
    fi
    # Small redo log and buffer pool: faster to create and to delete (96 MiB by default).
    local -a opts=(--innodb-log-file-size=16M --innodb-buffer-pool-size=64M)
    mkdir -p "$dir/data" "$dir/tmp"
    [[ $user == mysql ]] && chown -R mysql: "$dir"
    # --no-defaults: ignore /etc/mysql (the machine's own server and its socket).
    if ! mariadb-install-db --no-defaults --datadir="$dir/data" --user="$user" \
        --auth-root-authentication-method=normal --skip-test-db "${opts[@]}" \
        >"$dir/install-db.log" 2>&1; then
        _svc_fail mariadb "$dir/install-db.log" "mariadb-install-db failed"
        return 1
    fi
    _svc_spawn mariadb "$log" TERM "$(command -v mariadbd)" --no-defaults \
        --datadir="$dir/data" --tmpdir="$dir/tmp" --port="$port" --bind-address=127.0.0.1 \
        --socket="$sock" --pid-file="$dir/mariadbd.pid" --user="$user" \
        --innodb-flush-log-at-trx-commit=0 --skip-log-bin --log-error="$log" \
        "${opts[@]}" || return 1
    # Fresh install: root has no password yet; set one over the socket.
    _svc_wait mariadb "$log" mariadb --no-defaults --socket="$sock" -uroot -e 'select 1' ||
        return 1
    local sql
    sql=$(mariadb --no-defaults --socket="$sock" -uroot -N -e \
        "select concat('ALTER USER root@''', host, ''' IDENTIFIED BY ''$pw'';')
         from mysql.user where user = 'root'") || {
        _svc_fail mariadb "$log" "could not list root accounts"
        return 1
    }
    if ! mariadb --no-defaults --socket="$sock" -uroot -e "$sql FLUSH PRIVILEGES;" 2>>"$log"; then
        _svc_fail mariadb "$log" "could not set the root password"
        return 1
    fi
    _svc_wait mariadb "$log" mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$port" \
        -uroot -p"$pw" -e 'select 1' || return 1
    _svc_export mariadb BACKUPY_TEST_MARIADB_HOST 127.0.0.1
    _svc_export mariadb BACKUPY_TEST_MARIADB_PORT "$port"
    _svc_export mariadb BACKUPY_TEST_MARIADB_USER root
    _svc_export mariadb BACKUPY_TEST_MARIADB_PASSWORD "$pw"
    _svc_export mariadb BACKUPY_TEST_MARIADB_SOCKET "$sock"
    touch "$dir/ready"
}

services_start_mariadb_tls() {
    _svc_running mariadb_tls && return 0
    _svc_need core mariadb-install-db mariadbd mariadb openssl || return 1
    _svc_prepare mariadb_tls || return 1
    local dir=$BACKUPY_TEST_TMP/mariadb_tls port pw log user tls
    local sock=$dir/mysqld.sock
    log=$dir/mariadbd.log
    tls=$dir/tls
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    user=$(id -un)
    if [[ $(id -u) -eq 0 ]]; then
        if id mysql >/dev/null 2>&1; then user=mysql; else user=root; fi
    fi
    local -a opts=(--innodb-log-file-size=16M --innodb-buffer-pool-size=64M)
    mkdir -p "$dir/data" "$dir/tmp" "$tls"
    _svc_make_tls_certs "$tls" || {
        _svc_fail mariadb_tls "$tls/openssl.log" "cannot make the test certificates"
        return 1
    }
    # The server reads its own copies of its key and certificates.
    cp "$tls/server.pem" "$tls/server.key" "$tls/ca.pem" "$dir/"
    if [[ $user == mysql ]]; then
        chown -R mysql: "$dir/data" "$dir/tmp"
        chown mysql: "$dir" "$dir/server.pem" "$dir/server.key" "$dir/ca.pem"
    fi
    if ! mariadb-install-db --no-defaults --datadir="$dir/data" --user="$user" \
        --auth-root-authentication-method=normal --skip-test-db "${opts[@]}" \
        >"$dir/install-db.log" 2>&1; then
        _svc_fail mariadb_tls "$dir/install-db.log" "mariadb-install-db failed"
        return 1
    fi
    # require_secure_transport: TCP without TLS is refused (the socket stays plaintext).
    _svc_spawn mariadb_tls "$log" TERM "$(command -v mariadbd)" --no-defaults \
        --datadir="$dir/data" --tmpdir="$dir/tmp" --port="$port" --bind-address=127.0.0.1 \
        --socket="$sock" --pid-file="$dir/mariadbd.pid" --user="$user" \
        --innodb-flush-log-at-trx-commit=0 --skip-log-bin --log-error="$log" \
        --ssl-cert="$dir/server.pem" --ssl-key="$dir/server.key" --ssl-ca="$dir/ca.pem" \
        --require-secure-transport=ON "${opts[@]}" || return 1
    _svc_wait mariadb_tls "$log" mariadb --no-defaults --socket="$sock" -uroot -e 'select 1' ||
        return 1
    local sql
    sql=$(mariadb --no-defaults --socket="$sock" -uroot -N -e \
        "select concat('ALTER USER root@''', host, ''' IDENTIFIED BY ''$pw'';')
         from mysql.user where user = 'root'") || {
        _svc_fail mariadb_tls "$log" "could not list root accounts"
        return 1
    }
    if ! mariadb --no-defaults --socket="$sock" -uroot -e "$sql
        CREATE USER certuser@'%' REQUIRE SUBJECT '/CN=certuser';
        GRANT ALL ON *.* TO certuser@'%'; FLUSH PRIVILEGES;" 2>>"$log"; then
        _svc_fail mariadb_tls "$log" "could not set up the accounts"
        return 1
    fi
    _svc_wait mariadb_tls "$log" mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$port" \
        --ssl --ssl-ca="$tls/ca.pem" -uroot -p"$pw" -e 'select 1' || return 1
    _svc_export mariadb_tls BACKUPY_TEST_MARIADBTLS_PORT "$port"
    _svc_export mariadb_tls BACKUPY_TEST_MARIADBTLS_PASSWORD "$pw"
    _svc_export mariadb_tls BACKUPY_TEST_MARIADBTLS_SOCKET "$sock"
    _svc_export mariadb_tls BACKUPY_TEST_MARIADBTLS_DIR "$tls"
    touch "$dir/ready"
}

# ------------------------------------------------------------------------- Redis

_svc_redis_check() {
    [[ $(redis-cli -h 127.0.0.1 -p "$1" --no-auth-warning --user "$2" --pass "$3" ping 2>/dev/null) == PONG ]]
}

services_start_redis() {
    _svc_running redis && return 0
    _svc_need core redis-server redis-cli || return 1
    _svc_prepare redis || return 1
    local dir=$BACKUPY_TEST_TMP/redis port pw acl_pw log server
    log=$dir/redis.log
    server=$(command -v redis-server)
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    acl_pw=$(_svc_secret 16)
    # `backupy` may run everything, replication (SYNC/PSYNC/REPLCONF) included.
    cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
port $port
protected-mode yes
daemonize no
dir $dir
logfile ""
save ""
appendonly no
# replication (redis-cli --rdb, the agent's RDB dump) starts at once, not after 5 s
repl-diskless-sync-delay 0
dbfilename dump.rdb
requirepass $pw
user backupy on >$acl_pw ~* &* +@all
EOF
    _svc_spawn redis "$log" TERM "$server" "$dir/redis.conf" || return 1
    _svc_wait redis "$log" _svc_redis_check "$port" default "$pw" || return 1
    _svc_wait redis "$log" _svc_redis_check "$port" backupy "$acl_pw" || return 1
    _svc_export redis BACKUPY_TEST_REDIS_HOST 127.0.0.1
    _svc_export redis BACKUPY_TEST_REDIS_PORT "$port"
    _svc_export redis BACKUPY_TEST_REDIS_PASSWORD "$pw"
    _svc_export redis BACKUPY_TEST_REDIS_ACL_USER backupy
    _svc_export redis BACKUPY_TEST_REDIS_ACL_PASSWORD "$acl_pw"
    _svc_export redis BACKUPY_TEST_REDIS_SERVER "$server"
    touch "$dir/ready"
}

_svc_redis_tls_check() {
    [[ $(redis-cli --tls --cacert "$4/ca.pem" --cert "$4/client.pem" --key "$4/client.key" \
        -h 127.0.0.1 -p "$1" --no-auth-warning --user "$2" --pass "$3" ping 2>/dev/null) == PONG ]]
}

services_start_redis_tls() {
    _svc_running redis_tls && return 0
    _svc_need core redis-server redis-cli openssl || return 1
    _svc_prepare redis_tls || return 1
    local dir=$BACKUPY_TEST_TMP/redis_tls port pw acl_pw log server tls
    log=$dir/redis.log
    tls=$dir/tls
    server=$(command -v redis-server)
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    acl_pw=$(_svc_secret 16)
    mkdir -p "$tls"
    _svc_make_tls_certs "$tls" || {
        _svc_fail redis_tls "$tls/openssl.log" "cannot make the test certificates"
        return 1
    }
    # No plaintext port at all; a client certificate from the test CA is required.
    cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
port 0
tls-port $port
tls-cert-file $tls/server.pem
tls-key-file $tls/server.key
tls-ca-cert-file $tls/ca.pem
tls-auth-clients yes
protected-mode yes
daemonize no
dir $dir
logfile ""
save ""
appendonly no
repl-diskless-sync-delay 0
dbfilename dump.rdb
requirepass $pw
user backupy on >$acl_pw ~* &* +@all
EOF
    _svc_spawn redis_tls "$log" TERM "$server" "$dir/redis.conf" || return 1
    _svc_wait redis_tls "$log" _svc_redis_tls_check "$port" default "$pw" "$tls" || return 1
    _svc_export redis_tls BACKUPY_TEST_REDISTLS_PORT "$port"
    _svc_export redis_tls BACKUPY_TEST_REDISTLS_PASSWORD "$pw"
    _svc_export redis_tls BACKUPY_TEST_REDISTLS_ACL_USER backupy
    _svc_export redis_tls BACKUPY_TEST_REDISTLS_ACL_PASSWORD "$acl_pw"
    _svc_export redis_tls BACKUPY_TEST_REDISTLS_DIR "$tls"
    touch "$dir/ready"
}

# ---------------------------------------------------------------------------- S3
#
# s3s-fs 0.14.1 maps everything onto its root dir (BACKUPY_TEST_S3_DIR):
#   bucket B          -> directory  DIR/B   (CreateBucket is a mkdir; ListBuckets lists
#                        the sub-directories whose names are valid bucket names, so a
#                        test may also create a bucket with `mkdir "$BACKUPY_TEST_S3_DIR/B"`)
#   object B/K        -> file       DIR/B/K (a `/` in the key makes sub-directories)
#   object metadata   -> DIR/.bucket-<b64url(B)>.object-<b64url(K)>.metadata.json
#   multipart upload  -> DIR/.upload-<uuid>.json and its parts DIR/.upload_id-<uuid>.part-N
#                        (all removed by Complete/AbortMultipartUpload: a test can check
#                        that nothing is left over with `ls -a "$BACKUPY_TEST_S3_DIR"`)
#   writes go through DIR/.tmp.N.internal.part then a rename.
# Bucket names need >= 3 characters; path-style addressing only (no --domain given).
# Every signed request must carry x-amz-content-sha256 (the SDKs send it; with
# `curl --aws-sigv4` add -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD'), else 400.

_svc_s3s_bin() {
    local b=${BACKUPY_TEST_S3S_FS:-}
    [[ -z $b ]] && b=$(command -v s3s-fs 2>/dev/null)
    [[ -z $b ]] && b=${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs
    [[ -x $b ]] || {
        _svc_err "s3s-fs not found ($(_svc_install_hint s3))"
        return 1
    }
    echo "$b"
}

_svc_s3_check() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/") || return 1
    [[ $code == 403 ]]
}

services_start_s3() {
    _svc_running s3 && return 0
    local bin
    bin=$(_svc_s3s_bin) || return 1
    _svc_need core curl || return 1
    _svc_prepare s3 || return 1
    local dir=$BACKUPY_TEST_TMP/s3 port ak sk log
    log=$dir/s3s-fs.log
    mkdir -p "$dir/data"
    port=$(services_free_port) || return 1
    ak=AK$(_svc_secret 9)
    sk=$(_svc_secret 20)
    _svc_spawn s3 "$log" TERM env RUST_LOG=warn "$bin" --host 127.0.0.1 --port "$port" \
        --access-key "$ak" --secret-key "$sk" "$dir/data" || return 1
    # Unsigned request -> 403 AccessDenied: it answers and checks signatures.
    _svc_wait s3 "$log" _svc_s3_check "$port" || return 1
    _svc_export s3 BACKUPY_TEST_S3_ENDPOINT "http://127.0.0.1:$port"
    _svc_export s3 BACKUPY_TEST_S3_ACCESS_KEY "$ak"
    _svc_export s3 BACKUPY_TEST_S3_SECRET_KEY "$sk"
    _svc_export s3 BACKUPY_TEST_S3_REGION us-east-1
    _svc_export s3 BACKUPY_TEST_S3_DIR "$dir/data"
    touch "$dir/ready"
}

# ----------------------------------------------- S3 with Object Lock: moto
#
# moto_server (PyPI `moto[server]`, 5.2.1 here) for the Object Lock tests (issue 20).
# What it checks (seen in tests/it/object_lock.rs, or by hand with curl): a bucket created
# with `x-amz-bucket-object-lock-enabled: true` answers GetObjectLockConfiguration with
# ObjectLockEnabled=Enabled, one without it with ObjectLockConfigurationNotFoundError;
# a PutObject with lock headers but no Content-MD5 is refused
# (MissingUploadObjectWithObjectLockHeaders); HeadObject returns the object's
# x-amz-object-lock-retain-until-date; a DELETE of a locked version (?versionId=) is
# refused with 403 AccessDenied until the date, while a DELETE without a version only
# adds a delete marker (as S3 does). What it does NOT check: SigV4 signatures (any
# credentials are accepted; s3s-fs tests the signing), IAM policies (so "the backup
# credentials cannot delete" rests on the lock, not on a policy). Not exercised by the
# tests: multipart uploads with lock headers, governance bypass.
_svc_moto_check() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/") || return 1
    [[ $code == 200 ]]
}

services_start_moto() {
    _svc_running moto && return 0
    local bin=${BACKUPY_TEST_MOTO_SERVER:-}
    # scripts/install-deps.sh s3 puts it in the test venv.
    [[ -z $bin && -x $(_svc_venv)/bin/moto_server ]] && bin=$(_svc_venv)/bin/moto_server
    [[ -z $bin ]] && bin=$(command -v moto_server 2>/dev/null)
    [[ -n $bin ]] || {
        _svc_err "moto_server not found (pip install 'moto[server]')"
        return 1
    }
    _svc_need core curl || return 1
    _svc_prepare moto || return 1
    local dir=$BACKUPY_TEST_TMP/moto port log
    log=$dir/moto.log
    mkdir -p "$dir"
    port=$(services_free_port) || return 1
    _svc_spawn moto "$log" TERM "$bin" -H 127.0.0.1 -p "$port" || return 1
    _svc_wait moto "$log" _svc_moto_check "$port" || return 1
    _svc_export moto BACKUPY_TEST_MOTO_ENDPOINT "http://127.0.0.1:$port"
    touch "$dir/ready"
}

# ----------------------------------------------------- MongoDB wire: SecantusDB

_svc_venv() {
    echo "${BACKUPY_TEST_VENV:-${BACKUPY_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/backupy-test}/venv}"
}

# _svc_mongo_check PYTHON PORT [USER PW]: ping (authenticated when USER is given)
_svc_mongo_check() {
    _svc_tcp_open "$2" || return 1
    "$1" - "$2" "${3:-}" "${4:-}" <<'EOF'
import sys
from pymongo import MongoClient
port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
kw = dict(directConnection=True, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
if user:
    kw.update(username=user, password=pw, authSource="admin", authMechanism="SCRAM-SHA-256")
c = MongoClient("127.0.0.1", port, **kw)
c.admin.command("ping")
if user:
    c.admin.command("listDatabases")
EOF
}

services_start_mongo() {
    _svc_running mongo && return 0
    local venv py
    venv=$(_svc_venv)
    py=$venv/bin/python
    if [[ ! -x $py ]] || ! "$py" -c 'import secantus.cli, pymongo' 2>/dev/null; then
        _svc_err "SecantusDB venv not found or incomplete at $venv ($(_svc_install_hint mongo))"
        return 1
    fi
    _svc_prepare mongo || return 1
    local dir=$BACKUPY_TEST_TMP/mongo port user=backupy pw log
    log=$dir/secantus.log
    port=$(services_free_port) || return 1
    pw=$(_svc_secret 16)
    mkdir -p "$dir/data"
    # An explicit (empty) config file turns off the auto-discovery of ./secantusd.toml,
    # ~/.secantus/ and /etc/secantus/.
    : >"$dir/secantusd.toml"
    local -a cmd=("$py" -m secantus --config "$dir/secantusd.toml" --host 127.0.0.1
        --port "$port" --storage-path "$dir/data")
    # 1) without auth, to create the user
    (cd "$dir" && _svc_spawn mongo "$log" TERM "${cmd[@]}") || return 1
    _svc_wait mongo "$log" _svc_mongo_check "$py" "$port" || return 1
    if ! "$py" - "$port" "$user" "$pw" >>"$log" 2>&1 <<'EOF'; then
import sys
from pymongo import MongoClient
port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = MongoClient("127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=5000)
c.admin.command("createUser", user, pwd=pw, roles=["root"], mechanisms=["SCRAM-SHA-256"])
EOF
        _svc_fail mongo "$log" "createUser failed"
        return 1
    fi
    _svc_stop mongo
    # 2) restart with --auth on the same storage
    (cd "$dir" && _svc_spawn mongo "$log" TERM "${cmd[@]}" --auth) || return 1
    _svc_wait mongo "$log" _svc_mongo_check "$py" "$port" "$user" "$pw" || return 1
    _svc_export mongo BACKUPY_TEST_SECANTUS_HOST 127.0.0.1
    _svc_export mongo BACKUPY_TEST_SECANTUS_PORT "$port"
    _svc_export mongo BACKUPY_TEST_SECANTUS_USER "$user"
    _svc_export mongo BACKUPY_TEST_SECANTUS_PASSWORD "$pw"
    _svc_export mongo BACKUPY_TEST_SECANTUS_URL \
        "mongodb://$user:$pw@127.0.0.1:$port/?directConnection=true&authSource=admin"
    _svc_export mongo BACKUPY_TEST_SECANTUS_PYTHON "$py"
    touch "$dir/ready"
}

# ------------------------------------------------------------------------ Docker

_svc_docker_check() {
    if command -v curl >/dev/null 2>&1; then
        [[ $(curl -s --max-time 2 --unix-socket "$1" http://docker/_ping) == OK ]]
    else
        docker -H "unix://$1" info
    fi
}

# dockerd gives each running container 10 s to obey SIGTERM on shutdown: kill them first.
_svc_prestop_dockerd() {
    local sock=$BACKUPY_TEST_TMP/dockerd/docker.sock ids
    [[ -S $sock ]] && command -v docker >/dev/null 2>&1 || return 0
    ids=$(timeout 10 docker -H "unix://$sock" ps -q 2>/dev/null) || return 0
    # shellcheck disable=SC2086
    [[ -z $ids ]] || timeout 20 docker -H "unix://$sock" kill $ids >/dev/null 2>&1
    return 0
}

services_start_dockerd() {
    _svc_running dockerd && return 0
    _svc_need docker dockerd || return 1
    if [[ $(id -u) -ne 0 ]]; then
        _svc_err "dockerd: needs root"
        return 1
    fi
    _svc_prepare dockerd || return 1
    local dir=$BACKUPY_TEST_TMP/dockerd log
    local sock=$dir/docker.sock
    log=$dir/dockerd.log
    mkdir -p "$dir/data" "$dir/exec"
    # Explicit config file: ignore the machine's /etc/docker/daemon.json.
    echo '{}' >"$dir/daemon.json"
    _svc_spawn dockerd "$log" TERM "$(command -v dockerd)" --config-file "$dir/daemon.json" \
        --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
        --data-root "$dir/data" --exec-root "$dir/exec" --host "unix://$sock" \
        --pidfile "$dir/docker.pid" --shutdown-timeout 5 || return 1
    _svc_wait dockerd "$log" _svc_docker_check "$sock" || return 1
    _svc_export dockerd BACKUPY_TEST_DOCKER_SOCKET "$sock"
    _svc_export dockerd DOCKER_HOST "unix://$sock"
    touch "$dir/ready"
}

services_start_all() {
    services_start_postgres &&
        services_start_postgres_tls &&
        services_start_mariadb &&
        services_start_mariadb_tls &&
        services_start_redis &&
        services_start_redis_tls &&
        services_start_s3 &&
        services_start_mongo &&
        services_start_dockerd
}
