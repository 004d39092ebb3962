#!/usr/bin/env bash
# A throwaway PostgreSQL server for the `-m postgres` test tier (tests/test_postgres.py).
#   start DIR: installs the Debian package `postgresql` if it is missing (as root), runs initdb into
#              DIR/data as a non-root user, listens only on a unix socket in DIR, creates the
#              database `abliterate`, and prints its SQLAlchemy URL on stdout.
#   stop DIR:  stops that server.
# On failure it prints one line saying why on stderr and exits 1.
set -uo pipefail
cmd=${1:?usage: postgres_for_tests.sh start|stop DIR}
dir=${2:?usage: postgres_for_tests.sh start|stop DIR}
die() { echo "postgres_for_tests: $*" >&2; exit 1; }

bindir() {  # Debian keeps the server binaries off PATH, in /usr/lib/postgresql/VERSION/bin
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -z "$d" ] && d=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null)")" 2>/dev/null)
    [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/createdb" ] && echo "$d"
}

# Run as the server's owner: initdb and postgres refuse root.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    bin=$(bindir)
    if [ -z "$bin" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >/dev/null 2>&1
        bin=$(bindir)
    fi
    [ -n "$bin" ] || die "PostgreSQL is not installed and could not be installed (apt-get install postgresql)"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' user to own the server"
        chown postgres "$dir" || die "cannot chown $dir to postgres"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || die "initdb failed: $(tail -1 "$dir/initdb.log")"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses='' -c unix_socket_directories='$dir' -c max_connections=50 -c fsync=off" start \
        >/dev/null 2>&1 || die "the server did not start: $(tail -1 "$dir/server.log" 2>/dev/null)"
    as_owner "$bin/createdb" -h "$dir" -U postgres abliterate 2>"$dir/createdb.log" \
        || die "createdb failed: $(tail -1 "$dir/createdb.log")"
    echo "postgresql+psycopg2://postgres@/abliterate?host=$dir"
    ;;
stop)
    bin=$(bindir)
    [ -n "$bin" ] && [ -d "$dir/data" ] && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1
    # Only a dir this script set up (it holds a cluster, or the logs of a failed start) is removed.
    if [ -f "$dir/data/PG_VERSION" ] || [ -f "$dir/initdb.log" ]; then rm -rf "$dir"; fi
    ;;
*) die "unknown command $cmd (start or stop)" ;;
esac
