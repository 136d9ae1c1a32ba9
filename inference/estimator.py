"""The per-process pool that keeps estimators warm, keyed by the weight file it is handed: `estimator_get`.

It never resolves nor downloads: callers hand it a file through the registry's `weights_use`, whose loop
marks a file the network refuses corrupt and picks the next (inference.pipeline.estimator_ready).
An estimator runs one model from one cached weight file, in one of two runtimes (inference.runtime):
a verified ONNX Runtime artifact built from those weights (CPU; numpy pre- and postprocessing, no torch
in the process) or eager PyTorch (CUDA, the fallback, DEPTHSITE_RUNTIME=eager, and DEPTHSITE_FP16's bfloat16
on a CPU with AMX where it measures faster, `EstimatorPool._cpu_half`). This module does not
import torch: the eager runtime is imported only when a request needs it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from inference.runtime import runtime_select, say_once
from inference.runtime.base import DepthResult, Estimator
from inference.runtime.cpu import bf16_units
from inference.worker import worker_id
from models_registry.catalogue import approx_bytes
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.warm import (warm_model_forget, warm_model_record, warm_models_forget_at_exit,
                                           warm_models_heartbeat)
from models_registry.services.records import resource_error_code, weight_mark_corrupt, weight_mark_used

logger = logging.getLogger(__name__)

__all__ = ["DepthResult", "EstimatorPool", "estimator_get", "estimator_pool", "estimator_build"]

_EAGER_NAMES = ("DepthEstimator", "device_select", "network_bytes")


def __getattr__(name: str) -> Any:
    # The eager runtime's names, for callers that ask this module for them; importing them imports torch.
    if name in _EAGER_NAMES:
        from inference.runtime import eager

        return getattr(eager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def estimator_build(*, model: RegisteredModel, weight_file: WeightFile, device, half: bool,
                    compile: bool) -> Estimator:
    """An eager estimator (inference.runtime.eager.estimator_build), imported when first needed."""
    from inference.runtime.eager import estimator_build as build

    return build(model=model, weight_file=weight_file, device=device, half=half, compile=compile)


_failed_artifacts: set[tuple[str, str]] = set()  # (model, weights sha256) whose artifact failed: eager from now on
# (model, weights sha256) whose artifact of an earlier export recipe could not be rebuilt: that one is used from now on
_kept_older_recipe: set[tuple[str, str]] = set()

# Below this many images a process runs per model, its ONNX sessions skip repacking the weights when they open.
# bench/session_open.py measured where repacking starts to pay: from 2.8 images (DPT_Hybrid) to 6.5 (DPT_Large,
# 5 runs); one image without it: DPT_Large's open + first forward 0.79x of repacked (docs/performance.md).
PREPACK_FROM_RUNS = 4

# DEPTHSITE_FP16 on a CPU with AMX: bfloat16 is timed against float32 only in a process that runs at least this many
# images a model, and kept only when it takes under HALF_MARGIN of float32's time. Measured on AMX: DPT_Large 0.33x
# of fp32 eager and 0.35x of its ONNX artifact; MiDaS_small 0.72x of eager but 1.6x its artifact. The timing, torch's
# import and the second network cost a DPT_Large `predict` about 14 s: whole processes took 1.35x fp32's time on
# 4 photos and 0.90-0.96x on 8 (bench/half.py, docs/performance.md).
HALF_FROM_RUNS = 8
HALF_MARGIN = 0.9


def _weights_still_usable(weight_file) -> None:
    """After a failed build: WeightFileError when the build condemned the weights themselves (their tensors no longer
    match their record: inference.runtime.artifacts._built_from, in this process or a build process). Eager would
    load the same changed tensors and serve them under the record's sha256; the caller tries the next copy."""
    from depthsite.exceptions import WeightFileError
    from models_registry.choices import Health

    try:
        weight_file.refresh_from_db(fields=["health", "health_reason"])
    except type(weight_file).DoesNotExist:
        raise WeightFileError(f"{weight_file.model.name} [{weight_file.format}]: its record was removed while its "
                              "runtime artifact was built", extra={"model": weight_file.model.name}) from None
    if weight_file.health not in Health.USABLE:
        raise WeightFileError(f"{weight_file.model.name} [{weight_file.format}]: {weight_file.health_reason}",
                              extra={"model": weight_file.model.name, "format": weight_file.format})


def onnx_estimator_build(*, model: RegisteredModel, weight_file: WeightFile, prepack: bool = True) -> Estimator | None:
    """The ONNX estimator of these weights, building and checking the artifact first when there is none
    (in a child process unless DEPTHSITE_RUNTIME_BUILD=inline).

    None when there can be none (export or check failed, the file does not open): the caller runs eager,
    and the reason is logged once. Where the build fails and an artifact of an earlier export recipe serves these
    weights, that one is used (said once)."""
    from inference.runtime.artifacts import runtime_artifact_build, runtime_artifact_find
    from inference.runtime.export import export_recipe
    from models_registry import cachefs
    from depthsite.exceptions import ApplicationError

    failure_key = (model.name, weight_file.sha256)
    if failure_key in _failed_artifacts:
        return None
    artifact = runtime_artifact_find(model=model, weight_file=weight_file,
                                     earlier_recipe=failure_key in _kept_older_recipe)
    if artifact is None:
        try:
            if settings.DEPTHSITE_RUNTIME_BUILD == "process":
                from inference.runtime.build_process import artifact_build_in_child

                artifact = artifact_build_in_child(model=model, weight_file=weight_file)
            else:
                artifact = runtime_artifact_build(model=model, weight_file=weight_file)
        except ApplicationError as exc:
            _weights_still_usable(weight_file)
            # An artifact of an earlier recipe still serves these weights as it did (it passed its check when it
            # was built) rather than eager; the rebuild is tried again by the next process.
            kept = runtime_artifact_find(model=model, weight_file=weight_file, earlier_recipe=True)
            if kept is not None and kept.export_recipe == export_recipe(model.architecture):
                artifact = kept  # another process built this release's meanwhile
            elif kept is not None:
                _kept_older_recipe.add(failure_key)
                say_once(f"artifact-kept:{failure_key}", "%s keeps its ONNX artifact of export recipe %d: building "
                         "this release's failed (%s)", model.name, kept.export_recipe, exc.message)
                artifact = kept
            else:
                # Weights that do not load fail again in eager, which reports them (and they are marked corrupt);
                # behind a kept artifact they are found by `models verify` or the next weights in use.
                _failed_artifacts.add(failure_key)
                say_once(f"artifact:{failure_key}", "%s runs in eager PyTorch: no ONNX artifact (%s)", model.name,
                         exc.message)
                return None
    from inference.runtime.onnx import OnnxEstimator

    try:
        return OnnxEstimator(model_name=model.name, architecture=model.architecture, semantics=model.semantics,
                             weights_sha256=weight_file.sha256, weights_format=weight_file.format,
                             weight_file_id=weight_file.pk, artifact_path=cachefs.absolute(artifact.path),
                             artifact_bytes=artifact.size, threads=settings.DEPTHSITE_TORCH_THREADS,
                             prepack=prepack)
    except Exception as exc:  # onnxruntime's errors share no base class; any means this file cannot be used
        if resource_error_code(exc) is not None:
            # Short of file descriptors or memory for now: the artifact is not to blame (marking it corrupt would
            # cost a rebuild of minutes and eager for the rest of the process). Eager this once; the next load
            # tries the artifact again.
            say_once(f"artifact-short:{failure_key}", "%s runs in eager PyTorch this time: its ONNX artifact could "
                     "not be opened now (%s)", model.name, exc)
            return None
        weight_mark_corrupt(weight_file=artifact, reason=f"ONNX Runtime cannot open it: {exc}")
        _failed_artifacts.add(failure_key)
        say_once(f"artifact:{failure_key}", "%s runs in eager PyTorch: its ONNX artifact does not open (%s)",
                 model.name, exc)
        return None


class EstimatorPool:
    """Warm estimators keyed by (model, weights sha256, device, dtype, runtime), least recently used evicted first.

    At most `capacity` networks (DEPTHSITE_WARM_MODELS) and `max_bytes` of their tensors
    (DEPTHSITE_WARM_BYTES): room is made before a network is built, so a large model does not load
    next to the ones it will replace. One network larger than the budget alone is still kept (it must run).

    A WarmModel row is one per (model, device, dtype) in a worker, but the pool may hold several estimators of
    one such triple (old and new weights, ONNX and eager float32): the row describes the one admitted last, and
    evicting one of them hands the row to the most recently used that remains (deleted only when none does).
    """

    def __init__(self, capacity: int | None = None, max_bytes: int | None = None):
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._estimators: OrderedDict[tuple, Estimator] = OrderedDict()
        self._loaded_at: dict[tuple, datetime] = {}  # by estimator key: when it was admitted, for its warm row
        self._lock = threading.Lock()
        # Held while a warm row is written, with the check of what the pool holds that decided the write: without
        # it, a thread could record a row for an estimator another thread has just evicted and released.
        self._rows_lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}
        self.prepack = True  # a worker runs many images per model; see expect_runs
        self._half_choices: dict[tuple[str, str], str] = {}  # (model, weights sha256) -> dtype DEPTHSITE_FP16 runs
        self.expected_runs: int | None = None  # images per model this process will run, where it knows (predict)

    def expect_runs(self, count: int) -> None:
        """Say how many images this process will run per model before it exits (`manage.py predict` knows).
        Under PREPACK_FROM_RUNS, ONNX sessions open without repacking: for DPT_Large about 2.5 s less to open
        against a few per cent more per forward. Estimators already warm keep how they were opened. Under
        HALF_FROM_RUNS, DEPTHSITE_FP16 is not timed on a CPU with AMX, and float32 runs."""
        self.prepack = count >= PREPACK_FROM_RUNS
        self.expected_runs = count

    @property
    def capacity(self) -> int:
        return max(1, self._capacity or settings.DEPTHSITE_WARM_MODELS)

    @property
    def max_bytes(self) -> int | None:
        value = self._max_bytes if self._max_bytes is not None else getattr(settings, "DEPTHSITE_WARM_BYTES", None)
        return value or None

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._estimators.values())

    def get(self, *, model: RegisteredModel, weight_file: WeightFile, device: str | None = None,
            half: bool | None = None) -> Estimator:
        """The warm estimator of these weights, built from the handed file on first use (never resolved here:
        a file that does not load raises WeightFileError, and the caller's registry loop picks the next)."""
        use_half = bool(settings.DEPTHSITE_FP16 if half is None else half)
        estimator = None
        if runtime_select(device=device) == "onnx":
            def full() -> Estimator | None:
                return self._get_onnx(model=model, weight_file=weight_file)

            estimator = self._cpu_half(model=model, weight_file=weight_file, full=full) if use_half else full()
        if estimator is None:
            estimator = self._get_eager(model=model, weight_file=weight_file, device=device, use_half=use_half)
        weight_mark_used(weight_file=weight_file)
        return estimator

    def _get_onnx(self, *, model: RegisteredModel, weight_file: WeightFile) -> Estimator | None:
        key = (model.name, weight_file.sha256, "cpu", "torch.float32", "onnx")
        estimator = self._lookup(key)
        if estimator is None:
            with self._build_lock(key):
                estimator = self._lookup(key)
                if estimator is None:
                    self._evict(self._over_budget(incoming=approx_bytes(model.architecture), adding=1))
                    estimator = onnx_estimator_build(model=model, weight_file=weight_file, prepack=self.prepack)
                    if estimator is not None:
                        self._admit(model, weight_file, estimator)
        return estimator

    def _get_eager(self, *, model: RegisteredModel, weight_file: WeightFile, device: str | None,
                   use_half: bool) -> Estimator:
        import torch

        from inference.runtime.eager import configure_threads, device_select

        configure_threads()
        target = device_select(device)
        if use_half and target.type == "cpu":
            return self._cpu_half(model=model, weight_file=weight_file, full=lambda: self._get_eager(
                model=model, weight_file=weight_file, device=device, use_half=False))
        if use_half and target.type != "cuda":
            say_once(f"fp16-{target.type}", "DEPTHSITE_FP16 is ignored on %s: only CUDA and CPUs with AMX run 16-bit "
                     "floats here", target.type)
            use_half = False
        key = (model.name, weight_file.sha256, str(target), str(torch.float16 if use_half else torch.float32), "eager")
        estimator = self._lookup(key)
        if estimator is None:
            with self._build_lock(key):
                estimator = self._lookup(key)
                if estimator is None:
                    incoming = approx_bytes(model.architecture) // (2 if use_half else 1)
                    self._evict(self._over_budget(incoming=incoming, adding=1))
                    estimator = estimator_build(model=model, weight_file=weight_file, device=target,
                                                half=use_half, compile=settings.DEPTHSITE_COMPILE)
                    self._admit(model, weight_file, estimator)
        return estimator

    def _cpu_half(self, *, model: RegisteredModel, weight_file: WeightFile,
                  full: Callable[[], Estimator | None]) -> Estimator | None:
        """DEPTHSITE_FP16 on a CPU: bfloat16 eager where the CPU has AMX and it runs this model clearly faster than
        `full()`, its float32 estimator (the ONNX artifact or eager), timed against it once per process; else
        `full()`. A process that runs only a few images does not pay for the timing, and runs float32."""
        units = bf16_units()
        if units is None:
            say_once("fp16-cpu", "DEPTHSITE_FP16 is ignored on this CPU: without AMX bfloat16 units, 16-bit floats "
                     "ran slower than float32 on every CPU measured (docs/performance.md)")
            return full()
        if self.expected_runs is not None and self.expected_runs < HALF_FROM_RUNS:
            say_once("fp16-few", "DEPTHSITE_FP16 is not used for %d image(s) a model: timing bfloat16 against float32 "
                     "would cost more than it could save", self.expected_runs)
            return full()
        choice_key = (model.name, weight_file.sha256)
        if self._half_choices.get(choice_key) == "float32":
            return full()
        import torch

        from inference.runtime.eager import configure_threads

        configure_threads()  # the bfloat16 network gets the threads the float32 one has
        key = (model.name, weight_file.sha256, "cpu", str(torch.bfloat16), "eager")
        half = self._lookup(key)
        if half is not None:
            return half
        with self._build_lock(key):
            half = self._lookup(key)
            if half is not None:
                return half
            if self._half_choices.get(choice_key) == "float32":  # decided while this thread waited
                return full()
            reference = None
            if choice_key not in self._half_choices:
                reference = full()
                if reference is None:
                    return None
            # Room for it, but not at the cost of the estimator it is about to be timed against.
            self._evict([old for old in self._over_budget(incoming=approx_bytes(model.architecture) // 2, adding=1)
                         if old is not reference])
            try:
                half = estimator_build(model=model, weight_file=weight_file, device=torch.device("cpu"), half=True,
                                       compile=settings.DEPTHSITE_COMPILE)
                if reference is not None:
                    half_s, full_s = forward_race(half, reference, runs=2)
            except Exception as exc:  # noqa: BLE001 - float32 runs these weights whatever failed in bfloat16
                self._half_choices[choice_key] = "float32"
                logger.warning("DEPTHSITE_FP16: %s runs in float32: its bfloat16 network failed (%s: %s)", model.name,
                               type(exc).__name__, exc)
                if half is not None:
                    half.release()
                return full()  # not `reference`: another thread may have evicted (and released) it meanwhile
            if reference is not None:
                # bfloat16 costs precision (about 2e-2 of the range): kept only for a clear gain, not for noise.
                faster = half_s < HALF_MARGIN * full_s
                self._half_choices[choice_key] = "bfloat16" if faster else "float32"
                logger.log(logging.INFO if faster else logging.WARNING,
                           "DEPTHSITE_FP16: %s runs in %s on this CPU (%s): bfloat16 eager took %.3f s, float32 "
                           "(%s) %.3f s", model.name, "bfloat16" if faster else "float32", units, half_s,
                           reference.runtime, full_s)
                if not faster:
                    half.release()
                    return full()
                # It was built to be measured against and no longer runs here.
                self._evict([reference])
            self._admit(model, weight_file, half)
        return half

    def _admit(self, model: RegisteredModel, weight_file: WeightFile, estimator: Estimator) -> None:
        loaded_at = timezone.now()
        self._insert(estimator, loaded_at)
        logger.info("%s ready on %s (%s) in %.0f ms (%d MB)", model.name, estimator.device_name, estimator.runtime,
                    estimator.load_ms, estimator.bytes // 1_000_000)
        me = worker_id()
        with self._rows_lock:
            if not settings.Q_CLUSTER.get("sync"):
                # A worker (or `predict`) that exits takes its rows with it; tasks run inline (tests) belong to no
                # worker. Arranged before the row is written: a stop between the two would miss it.
                warm_models_forget_at_exit(worker=me)
            with self._lock:
                held = self._estimators.get(estimator.key) is estimator
            if held:  # not evicted meanwhile by another thread's insert
                warm_model_record(model=model, weight_file=weight_file, worker=me, device=estimator.device_name,
                                  dtype=estimator.dtype_name, load_ms=estimator.load_ms, bytes=estimator.bytes,
                                  loaded_at=loaded_at)

    def _lookup(self, key: tuple) -> Estimator | None:
        with self._lock:
            estimator = self._estimators.get(key)
            if estimator is not None:
                self._estimators.move_to_end(key)
            return estimator

    def _build_lock(self, key: tuple) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def _over_budget(self, *, incoming: int = 0, adding: int = 0) -> list[Estimator]:
        """Least recently used estimators to drop so that `adding` more networks of `incoming` bytes fit."""
        limit = self.max_bytes
        with self._lock:
            held = list(self._estimators.values())  # least recently used first
        # After an insert the newest network always stays: without it the request could not run at all.
        candidates = held if adding else held[:-1]
        count = len(held) + adding
        total = sum(e.bytes for e in held) + incoming
        chosen = []
        for old in candidates:
            if count <= self.capacity and (limit is None or total <= limit):
                break
            chosen.append(old)
            count -= 1
            total -= old.bytes
        return chosen

    def _insert(self, estimator: Estimator, loaded_at: datetime) -> None:
        with self._lock:
            self._estimators[estimator.key] = estimator
            self._estimators.move_to_end(estimator.key)
            # With it: the evictions below may hand the warm row to this estimator.
            self._loaded_at[estimator.key] = loaded_at
        self._evict(self._over_budget())
        if self.max_bytes is not None and estimator.bytes > self.max_bytes:
            logger.warning("%s alone holds %d bytes, over DEPTHSITE_WARM_BYTES=%d; kept while it is used",
                           estimator.model_name, estimator.bytes, self.max_bytes)

    def _evict(self, victims: list[Estimator]) -> None:
        evicted = []
        with self._lock:
            for old in victims:
                if self._estimators.get(old.key) is old:
                    del self._estimators[old.key]
                    self._loaded_at.pop(old.key, None)
                    evicted.append(old)
        for old in evicted:
            logger.info("evicting warm %s (%s, %s) from this process", old.model_name, old.device_name, old.runtime)
            try:
                # A savepoint of its own: a failed statement must not break a caller's surrounding transaction.
                with self._rows_lock, transaction.atomic():
                    model = RegisteredModel.objects.get(name=old.model_name)
                    survivor = self._row_survivor(old)
                    if survivor is None:
                        warm_model_forget(worker=worker_id(), model=model, device=old.device_name,
                                          dtype=old.dtype_name)
                    else:
                        self._row_rerecord(model, *survivor)
            except RegisteredModel.DoesNotExist:
                pass
            except DatabaseError as exc:
                # The network goes all the same. A row left behind goes at the worker's next heartbeat
                # (rows_heartbeat), or when this estimator's model is recorded again or the worker exits.
                logger.warning("could not update the warm-model row of %s (%s)", old.model_name, exc)
            finally:
                old.release()

    def _row_survivor(self, gone: Estimator) -> tuple[Estimator, datetime | None] | None:
        """The most recently used estimator still held that shares `gone`'s warm row (model, device, dtype), and
        when it was admitted."""
        row = (gone.model_name, gone.device_name, gone.dtype_name)
        with self._lock:
            for estimator in reversed(self._estimators.values()):
                if (estimator.model_name, estimator.device_name, estimator.dtype_name) == row:
                    return estimator, self._loaded_at.get(estimator.key)
        return None

    def _row_rerecord(self, model: RegisteredModel, estimator: Estimator, loaded_at: datetime | None) -> None:
        """Record the warm row for `estimator` (built from the file `weight_file_id` names, the one it was admitted
        with), which an evicted estimator sharing the row may have written last."""
        # The file's row may have gone while the network stayed loaded: the warm row still names its weights.
        # A file row is updated in place when its weights change: it names this estimator's file only while the
        # hash is the same.
        weight_file = WeightFile.objects.filter(pk=estimator.weight_file_id, sha256=estimator.weights_sha256).first()
        warm_model_record(model=model, weight_file=weight_file, worker=worker_id(), device=estimator.device_name,
                          dtype=estimator.dtype_name, load_ms=estimator.load_ms, bytes=estimator.bytes,
                          weights_sha256=estimator.weights_sha256, loaded_at=loaded_at)

    def rows_heartbeat(self) -> int:
        """This worker's warm rows, as the heartbeat keeps them: those of the networks held renewed, any other (an
        eviction whose delete failed) deleted; the number renewed. Under the rows lock, so a network admitted or
        evicted meanwhile records or deletes its row after this, not between the look and the write."""
        with self._rows_lock:
            with self._lock:
                held = {(e.model_name, e.device_name, e.dtype_name) for e in self._estimators.values()}
            return warm_models_heartbeat(worker=worker_id(), held=held)

    def rows_freeze(self, timeout: float) -> bool:
        """Stop this pool writing warm rows, for good: the process is ending and its rows are about to go (a row
        written after their delete would stay until the staleness sweep). False when a write did not end within
        `timeout` seconds."""
        return self._rows_lock.acquire(timeout=timeout)

    def warm(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"model": e.model_name, "weights_sha256": e.weights_sha256, "device": e.device_name,
                     "dtype": e.dtype_name, "runtime": e.runtime, "load_ms": e.load_ms, "bytes": e.bytes}
                    for e in self._estimators.values()]

    def clear(self) -> None:
        with self._rows_lock:
            with self._lock:
                self._estimators.clear()
                self._loaded_at.clear()
                self._building.clear()
            warm_model_forget(worker=worker_id())


def forward_race(first: Estimator, second: Estimator, *, runs: int = 1) -> tuple[float, float]:
    """Seconds of one predict of each on a photo at the network's own input size, after one untimed predict of
    each (which builds kernels and maps weights in); with more runs, alternating, the fastest of each."""
    from models_registry.detweights import synthetic_image

    image = synthetic_image(*first.config.net_size)
    times: tuple[list[float], list[float]] = ([], [])
    for estimator in (first, second):
        estimator.predict(image)
    for _ in range(runs):
        for estimator, seconds in zip((first, second), times):
            started = time.perf_counter()
            estimator.predict(image)
            seconds.append(time.perf_counter() - started)
    return min(times[0]), min(times[1])


_pool = EstimatorPool()


def estimator_get(*, model: RegisteredModel, weight_file: WeightFile, device: str | None = None,
                  half: bool | None = None) -> Estimator:
    """A warm estimator of this weight file from this process's pool (built on first use), in the runtime
    runtime_select picks. It never resolves: callers pass it to the registry's `weights_use`."""
    return _pool.get(model=model, weight_file=weight_file, device=device, half=half)


def estimator_pool() -> EstimatorPool:
    return _pool
