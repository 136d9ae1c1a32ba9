#!/usr/bin/env bash
# Production processes with depthsite.settings.production (DJANGO_DEBUG=0, DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS set):
#   scripts/serve.sh release            migrate, collect static files, `check --deploy` (once per release)
#   scripts/serve.sh web [gunicorn ...] gunicorn with deploy/gunicorn.conf.py (extra flags override it)
#   scripts/serve.sh worker             one django-q2 cluster (one per GPU, or one per CPU-only machine)
#   scripts/serve.sh [all]              one machine: release, then a worker and the web server; Ctrl-C stops both
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export DJANGO_SETTINGS_MODULE=${DJANGO_SETTINGS_MODULE:-depthsite.settings.production}

role=${1:-all}
[ $# -gt 0 ] && shift

release() {
    "$PY" manage.py migrate --noinput
    "$PY" manage.py collectstatic --noinput -v0
    "$PY" manage.py check --deploy --fail-level WARNING
}

case "$role" in
release)
    release
    ;;
web)
    exec "$PY" -m gunicorn --config deploy/gunicorn.conf.py "$@" depthsite.wsgi:application
    ;;
worker)
    exec "$PY" manage.py qcluster
    ;;
all)
    release
    "$PY" manage.py qcluster &
    cluster=$!
    "$PY" -m gunicorn --config deploy/gunicorn.conf.py "$@" depthsite.wsgi:application &
    web=$!
    # Whichever stops first (or a SIGTERM/Ctrl-C to this script) stops the other, and we wait for both.
    trap 'kill "$cluster" "$web" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
    trap 'exit 143' INT TERM
    wait -n
    ;;
*)
    echo "usage: scripts/serve.sh [release|web|worker|all] [gunicorn flags for web/all]" >&2
    exit 2
    ;;
esac
