"""A qcluster worker process's end: it removes its own warm-model rows when stopped, SIGTERM included."""
from __future__ import annotations

import logging
import os
import signal
import threading

from django.conf import settings

from models_registry.services.warm import warm_models_exit_forget

logger = logging.getLogger(__name__)

# How long a worker sent SIGTERM waits for its rows to go before it dies as it would have.
EXIT_FORGET_SECONDS = 5.0
_installed_pid: int | None = None


def worker_exit_hooks_install() -> bool:
    """In a qcluster worker (post_spawn): SIGTERM removes this process's warm rows, then ends it as before.

    A clean stop (`qcluster` sent SIGTERM or Ctrl-C, a recycled worker) runs the multiprocessing finalizer that
    the estimator pool arranged (`warm_models_forget_at_exit`). A worker sent SIGTERM itself (`systemctl stop`
    signals every process of the service, `kill PID`) would die at once by django-q2's default: this handler
    deletes the rows first, then restores the default and sends the signal again, so the exit status and the
    cluster's reaction stay those of a SIGTERM. False when tasks run inline (no worker) or already installed.
    """
    global _installed_pid
    if settings.Q_CLUSTER.get("sync") or _installed_pid == os.getpid():
        return False
    _installed_pid = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum, frame) -> None:
    # The main thread may be inside a query on its own connection: the rows go from a thread with its own.
    forgetting = threading.Thread(target=warm_models_exit_forget, name="depthsite-warm-exit", daemon=True)
    forgetting.start()
    forgetting.join(EXIT_FORGET_SECONDS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
