# shellcheck shell=bash
# Shared helpers for scripts/test and scripts/demo. Source it; don't run it.
#
#   . "$(dirname "$0")/lib.sh"
#
# Everything here is prefixed `bf_` so it cannot collide with the caller's names.

# Repository root (the directory that holds Cargo.toml).
BF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BF_ROOT

bf_log() { printf '==> %s\n' "$*" >&2; }
bf_warn() { printf 'warning: %s\n' "$*" >&2; }
bf_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly if we are root, else through sudo.
bf_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        bf_die "need root to run '$*' (not root and sudo is not installed)"
    fi
}

# bf_apt_install PKG...: install Debian packages non-interactively.
bf_apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        bf_die "apt-get not found; install these packages by hand: $*"
    bf_log "installing $* with apt-get"
    bf_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    bf_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# bf_need CMD [PACKAGE]: make sure CMD is on PATH, installing PACKAGE (default CMD) if not.
bf_need() {
    local cmd=$1 pkg=${2:-$1}
    command -v "$cmd" >/dev/null 2>&1 && return 0
    bf_apt_install "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || bf_die "'$cmd' still not found after installing '$pkg'"
}

# pg_virtualenv (package postgresql-common, pulled in by `postgresql`) starts a throwaway cluster.
bf_ensure_pg_virtualenv() {
    bf_need pg_virtualenv postgresql
    bf_need psql postgresql-client
    # pg_virtualenv needs a server (any version under /usr/lib/postgresql/*/bin).
    if ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
        bf_apt_install postgresql
    fi
}

# bf_pg_virtualenv [pg_virtualenv -o options...] -- COMMAND...
# Runs COMMAND inside a throwaway cluster. Always:
#   -t        keep the cluster in a temp dir even as root. Without it root uses the fixed cluster name
#             15/regress under /etc/postgresql and a second concurrent run (test + demo) refuses to start.
#   -c ...    UTF8 encoding and C.UTF-8 locale whatever the caller's LANG is (a bare container has no
#             LANG, which would give SQL_ASCII databases).
# pg_virtualenv itself already runs the cluster with fsync=off (it is throwaway).
# It exports PGHOST (always "localhost", i.e. TCP), PGPORT, PGUSER, PGPASSWORD and PGDATABASE,
# and drops the cluster when COMMAND exits, whatever its status (which it passes on).
bf_pg_virtualenv() {
    local opts=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        opts+=("$1")
        shift
    done
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || bf_die "bf_pg_virtualenv: no command given"
    bf_ensure_pg_virtualenv
    # pg_virtualenv honours a pre-set PGPORT as the port for the new cluster; don't let a stray one leak in.
    unset PGPORT PGHOST PGHOSTADDR PGSERVICE PGDATABASE PGUSER PGPASSWORD
    exec pg_virtualenv -t -c '--locale=C.UTF-8 --encoding=UTF8' "${opts[@]}" "$@"
}

# bf_urlencode STRING: percent-encode everything but RFC 3986 unreserved characters (byte-wise).
bf_urlencode() {
    local LC_ALL=C
    local s=$1 out='' c hex i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
        [a-zA-Z0-9.~_-]) out+=$c ;;
        *)
            printf -v hex '%%%02X' "'$c"
            out+=$hex
            ;;
        esac
    done
    printf '%s' "$out"
}

# bf_database_url [DBNAME] [EXTRA_QUERY]: a postgres:// URL built from the libpq PG* environment
# (PGHOST may be a host name, an IP address or a Unix socket directory). Understood by sqlx and psql.
bf_database_url() {
    local db=${1:-postgres} extra=${2:-}
    local host=${PGHOST:-localhost} port=${PGPORT:-5432} user=${PGUSER:-$(id -un)} pw=${PGPASSWORD:-}
    local url
    if [[ "$host" == /* ]]; then
        # Socket directory: an empty authority plus host=/dir in the query (libpq and sqlx both accept it).
        url="postgres:///$(bf_urlencode "$db")?host=$(bf_urlencode "$host")&port=$port&user=$(bf_urlencode "$user")"
        [[ -n "$pw" ]] && url+="&password=$(bf_urlencode "$pw")"
        [[ -n "$extra" ]] && url+="&$extra"
    else
        [[ "$host" == *:* && "$host" != \[* ]] && host="[$host]" # IPv6 literal
        local auth
        auth=$(bf_urlencode "$user")
        [[ -n "$pw" ]] && auth+=":$(bf_urlencode "$pw")"
        url="postgres://$auth@$host:$port/$(bf_urlencode "$db")"
        [[ -n "$extra" ]] && url+="?$extra"
    fi
    printf '%s' "$url"
}

# bf_redact_url URL: the URL with its password replaced by ***, for printing.
bf_redact_url() {
    # shellcheck disable=SC2001 # sed is clearer than parameter expansion here
    sed -e 's#^\([a-z]*://[^:/@]*\):[^@]*@#\1:***@#' -e 's#\([?&]password=\)[^&]*#\1***#' <<<"$1"
}
