"""gunicorn settings for the depthsite web tier; flags given on the command line override these."""
import os

# Behind a reverse proxy on the same machine; `--bind 0.0.0.0:8000` where the proxy is elsewhere (compose).
bind = "127.0.0.1:8000"
# Sync workers are right behind a buffering proxy: pages and the API are light (inference runs on the worker
# machines), so the count follows the cores; each worker is one Django process.
workers = min(2 * (os.cpu_count() or 1) + 1, 9)
# Weight imports (up to DEPTHSITE_MAX_IMPORT_BYTES) and result downloads take longer than gunicorn's 30 s.
timeout = 300
graceful_timeout = 30
# Restart workers now and then so slow leaks cannot grow; the jitter keeps them from restarting together.
max_requests = 2000
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
# Heartbeat files in memory, not on a container's overlay disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
