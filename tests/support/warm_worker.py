"""A real django-q2 worker process that records a warm-model row, then is stopped (run by test_worker_exit.py).

`python -m tests.support.warm_worker stop|sigterm|sigterm-to-another-thread|sigkill|masks` in a site's environment (depthsite/testing/cli.py):
forks `django_q.worker.worker` as the sentinel does, has it run `record_warm_row`, stops it the chosen way,
and prints one JSON line: the worker's name, its rows before and after, and its exit code.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def record_warm_row() -> str:
    """The task: what the estimator pool does when it has built a network (without torch)."""
    import faulthandler

    # Should the worker outlive the signal it is sent, SIGUSR1 makes it print every thread's stack to the
    # stderr the test captures: the one time it did (a full run under load), nothing said where it was.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from inference.worker import worker_id
    from models_registry.models import RegisteredModel
    from models_registry.services.warm import warm_model_record, warm_models_forget_at_exit

    worker = worker_id()
    warm_model_record(model=RegisteredModel.objects.get(name="MiDaS_small"), weight_file=None, worker=worker,
                      device="cpu", dtype="float32")
    warm_models_forget_at_exit(worker=worker)
    return worker


def record_warm_row_main_deaf() -> str:
    """record_warm_row, then the worker's main thread blocks SIGTERM: the kernel must hand the signal to another
    thread, as it may do to any idle worker (whose main thread sits in a read of its task queue)."""
    worker = record_warm_row()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return worker


def sigterm_blocked_per_thread() -> dict:
    """record_warm_row, then a thread of the task's own; {thread name: whether SIGTERM is in its blocked mask},
    read from /proc for every thread of the worker (the kernel's view, whatever Python thinks)."""
    import threading
    from pathlib import Path

    record_warm_row()
    done = threading.Event()
    threading.Thread(target=done.wait, name="task-thread", daemon=True).start()
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    masks = {}
    for task in Path("/proc/self/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        masks[names.get(int(task.name), task.name)] = bool(int(status["SigBlk"], 16) & (1 << (signal.SIGTERM - 1)))
    done.set()
    return masks


def main(mode: str) -> None:
    import django

    django.setup()
    from django.db import connections
    from django_q.cluster import get_mp_context
    from django_q.worker import worker

    from models_registry.models import WarmModel

    # As django-q2's Sentinel sets up its workers: Ctrl-C is the cluster's business, SIGTERM is default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    context = get_mp_context()
    tasks, results = context.Queue(), context.Queue()
    connections.close_all()
    process = context.Process(target=worker, args=(tasks, results, context.Value("f", -1), 60))
    process.start()
    task = {"sigterm-to-another-thread": "record_warm_row_main_deaf", "masks": "sigterm_blocked_per_thread"}.get(
        mode, "record_warm_row")
    tasks.put({"id": "warm-1", "name": "warm-1", "func": f"{__name__}.{task}", "args": (), "kwargs": {}})
    done = results.get(timeout=120)
    if mode == "masks":
        tasks.put("STOP")
        process.join(60)
        print(json.dumps({"masks": done["result"], "success": done["success"]}))
        return
    name = done["result"]
    before = WarmModel.objects.filter(worker=name).count()
    if mode == "stop":
        tasks.put("STOP")  # what the sentinel sends every worker when qcluster gets SIGTERM or Ctrl-C
    else:
        os.kill(process.pid, signal.SIGKILL if mode == "sigkill" else signal.SIGTERM)
    process.join(60)
    exitcode, stuck = process.exitcode, process.exitcode is None
    if stuck:  # alive a minute after its stop: its stacks to stderr, then gone (else this script hangs at exit)
        os.kill(process.pid, signal.SIGUSR1)
        process.join(5)
        process.kill()
        process.join(10)
    after = WarmModel.objects.filter(worker=name).count()
    print(json.dumps({"worker": name, "success": done["success"], "before": before, "after": after,
                      "exitcode": exitcode, "stuck": stuck}))


if __name__ == "__main__":
    main(sys.argv[1])
