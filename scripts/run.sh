#!/usr/bin/env bash
# Start the web server and a django-q2 cluster on the embedded defaults; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${DEPTHSITE_HOST:-127.0.0.1}
PORT=${DEPTHSITE_PORT:-8000}
# The local default: debug on (static files served by runserver, a key generated into var/secret_key).
export DJANGO_DEBUG=${DJANGO_DEBUG:-1}
export DEPTHSITE_PUBLIC_UPLOADS=${DEPTHSITE_PUBLIC_UPLOADS:-1}
export DEPTHSITE_PUBLIC_STATUS=${DEPTHSITE_PUBLIC_STATUS:-1}
export DEPTHSITE_LOG_LEVEL=${DEPTHSITE_LOG_LEVEL:-INFO}

"$PY" manage.py qcluster &
cluster=$!
trap 'kill "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true' EXIT INT TERM

echo
echo "depthsite is running at http://$HOST:$PORT/"
echo "  upload a photo:     http://$HOST:$PORT/"
echo "  model dashboard:    http://$HOST:$PORT/models/"
echo "  API docs:           http://$HOST:$PORT/api/docs/"
echo "  admin:              http://$HOST:$PORT/admin/  (create an account: .venv/bin/python manage.py createsuperuser)"
echo
"$PY" manage.py runserver --noreload "$HOST:$PORT"
