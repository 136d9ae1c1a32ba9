"""The database: DATABASE_URL (PostgreSQL for many machines) or a local SQLite file tuned for workers."""
import dj_database_url

from depthsite import env

_default = dj_database_url.parse(env.DATABASE_URL, conn_max_age=env.DATABASE_CONN_MAX_AGE, conn_health_checks=True)
if _default["ENGINE"] == "django.db.backends.sqlite3":
    # Web server and qcluster write concurrently: WAL lets readers proceed during a write, IMMEDIATE
    # transactions take the write lock up front (no deadlock-on-upgrade), and the timeout waits out
    # short locks instead of failing with "database is locked".
    _default["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    if _default["NAME"] not in ("", ":memory:"):
        from pathlib import Path

        Path(_default["NAME"]).parent.mkdir(parents=True, exist_ok=True)

DATABASES = {"default": _default}
