"""DEPTHSITE_FP16 on a CPU: bfloat16 where the CPU has AMX and it measures faster than float32, float32 otherwise."""
from __future__ import annotations

import logging
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from inference import estimator as estimator_module
from inference.estimator import EstimatorPool, forward_race
from inference.runtime import cpu
from models_registry.detweights import synthetic_image
from tests.support.estimators import pool_warm
from tests.nets.fidelity import relative_error

AMX_FLAGS = "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"


# The tests here are about what runs, not how an artifact is built: MiDaS_small's is built once a process.
pytestmark = pytest.mark.usefixtures("fresh_runtime_state", "artifact_builds_once")


@pytest.fixture(autouse=True)
def _fresh_cpu_state(settings):
    settings.DEPTHSITE_FP16 = False
    yield
    cpu.cpu_fields.cache_clear()


class Race:
    """forward_race's stand-in: the given (bfloat16 s, float32 s), and what it was handed."""

    def __init__(self, half_s: float, full_s: float):
        self.result = (half_s, full_s)
        self.calls: list[tuple] = []

    def __call__(self, half, full, runs=1):
        # Both must still run when they are timed: neither may have been released to make room.
        assert getattr(full, "session", True) is not None
        assert runs >= 2  # one sample each is noise
        self.calls.append((half, full))
        return self.result


def with_amx(monkeypatch, race: Race | None = None) -> None:
    monkeypatch.setattr(estimator_module, "bf16_units", lambda: "AMX")
    if race is not None:
        monkeypatch.setattr(estimator_module, "forward_race", race)


@pytest.mark.parametrize("flags, units", [
    (AMX_FLAGS, "AMX"),
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", None),  # bf16 dot products (Zen 4), no tiles: not enough
    ("fpu sse2 avx2", None),
])
def test_bf16_units_are_read_from_cpuinfo(tmp_path, monkeypatch, flags, units):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some  CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: amx_bf16"
                    " amx_tile\n")
    monkeypatch.setattr(cpu, "CPUINFO", str(info))
    cpu.cpu_fields.cache_clear()
    assert cpu.bf16_units() == units
    assert cpu.cpu_name().endswith("Some CPU (AVX-512, AMX)" if units else "Some CPU (AVX-512)" if "avx512f" in flags
                                   else "Some CPU (AVX2)")


def test_no_cpuinfo_means_no_bf16_units(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", str(tmp_path / "absent"))
    cpu.cpu_fields.cache_clear()
    assert cpu.bf16_units() is None and cpu.cpu_flags() == frozenset()


@pytest.mark.parametrize("runtime", ["onnx", "eager"])
def test_without_amx_fp16_is_ignored_with_one_warning(settings, cached_small, pool, caplog, monkeypatch, runtime):
    settings.DEPTHSITE_RUNTIME = runtime
    monkeypatch.setattr(estimator_module, "bf16_units", lambda: None)
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        first = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
        again = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert first is again and first.dtype_name == "float32" and first.runtime == runtime
    said = [r.getMessage() for r in caplog.records if "DEPTHSITE_FP16" in r.getMessage()]
    assert said == ["DEPTHSITE_FP16 is ignored on this CPU: without AMX bfloat16 units, 16-bit floats ran slower "
                    "than float32 on every CPU measured (docs/performance.md)"]


@pytest.mark.parametrize("runtime", ["onnx", "eager"])
def test_with_amx_bfloat16_is_kept_where_it_is_faster(settings, cached_small, pool, caplog, monkeypatch, runtime):
    settings.DEPTHSITE_RUNTIME = runtime
    race = Race(0.1, 0.3)
    with_amx(monkeypatch, race)
    with caplog.at_level(logging.INFO, logger="inference.estimator"):
        half = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert (half.runtime, half.dtype_name) == ("eager", "bfloat16")
    assert race.calls == [(half, race.calls[0][1])] and race.calls[0][1].runtime == runtime
    assert race.calls[0][1].dtype_name == "float32"
    # The float32 estimator was only there to be timed against: the pool holds the bfloat16 one alone.
    assert [(w["runtime"], w["dtype"]) for w in pool.warm()] == [("eager", "bfloat16")]
    said = [r.getMessage() for r in caplog.records if "DEPTHSITE_FP16" in r.getMessage()]
    assert said == [f"DEPTHSITE_FP16: MiDaS_small runs in bfloat16 on this CPU (AMX): bfloat16 eager took 0.100 s, "
                    f"float32 ({runtime}) 0.300 s"]
    # Decided once per process: the next request neither times nor rebuilds anything.
    assert pool_warm(pool, "MiDaS_small", device="cpu", half=True) is half
    # Evicted, it is rebuilt as bfloat16 straight away, without its float32 twin and without a second race.
    pool.clear()
    again = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert again is not half and again.dtype_name == "bfloat16" and len(race.calls) == 1
    assert [(w["runtime"], w["dtype"]) for w in pool.warm()] == [("eager", "bfloat16")]
    # A request without DEPTHSITE_FP16 still gets float32.
    assert pool_warm(pool, "MiDaS_small", device="cpu", half=False).dtype_name == "float32"


@pytest.mark.parametrize("runtime, times", [("onnx", (0.5, 0.2)), ("eager", (0.5, 0.2)),
                                           ("onnx", (0.19, 0.2))])  # within 10 %: not worth the precision
def test_with_amx_float32_stays_where_bfloat16_is_not_clearly_faster(settings, cached_small, pool, caplog,
                                                                      monkeypatch, runtime, times):
    settings.DEPTHSITE_RUNTIME = runtime
    race = Race(*times)
    with_amx(monkeypatch, race)
    built = []
    real_build = estimator_module.estimator_build
    monkeypatch.setattr(estimator_module, "estimator_build",
                        lambda **kw: built.append(kw["half"]) or real_build(**kw))
    with caplog.at_level(logging.INFO, logger="inference.estimator"):
        full = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
        again = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert again is full and (full.runtime, full.dtype_name) == (runtime, "float32")
    assert len(race.calls) == 1 and built.count(True) == 1  # the bfloat16 network was built once, to be timed
    assert [(w["runtime"], w["dtype"]) for w in pool.warm()] == [(runtime, "float32")]
    warned = [r for r in caplog.records if "DEPTHSITE_FP16" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert f"MiDaS_small runs in float32 on this CPU (AMX): bfloat16 eager took {times[0]:.3f} s" in \
        warned[0].getMessage()


def test_a_full_pool_keeps_the_estimator_being_timed(settings, cached_small, monkeypatch):
    """With room for one network, making room for the bfloat16 one must not release the float32 one first."""
    pool = EstimatorPool(capacity=1)
    race = Race(0.1, 0.3)  # asserts that the ONNX session it is handed is still open
    with_amx(monkeypatch, race)
    try:
        half = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
        assert half.dtype_name == "bfloat16" and len(race.calls) == 1
        assert race.calls[0][1].session is None  # released once it lost
    finally:
        pool.clear()


@pytest.mark.django_db(transaction=True)
def test_two_requests_at_once_time_once_and_both_get_the_winner(settings, cached_small, monkeypatch):
    """The second request waits for the first one's decision; it must not build bfloat16 after float32 won, nor
    release the float32 estimator the first one is about to run (a one-network pool)."""
    pool = EstimatorPool(capacity=1)
    race = Race(0.5, 0.2)
    with_amx(monkeypatch, race)
    built = []
    real_build = estimator_module.estimator_build
    monkeypatch.setattr(estimator_module, "estimator_build",
                        lambda **kw: built.append(kw["half"]) or time.sleep(0.2) or real_build(**kw))
    got, errors = [], []

    def request():
        try:
            got.append(pool_warm(pool, "MiDaS_small", device="cpu", half=True))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors and len(got) == 2 and got[0] is got[1]
        assert got[0].dtype_name == "float32" and got[0].session is not None
        assert len(race.calls) == 1 and built.count(True) == 1
        got[0].predict(synthetic_image(32, 48))
    finally:
        pool.clear()


def test_a_bfloat16_network_that_fails_leaves_float32_running(settings, cached_small, pool, caplog, monkeypatch):
    race = Race(0.1, 0.3)
    with_amx(monkeypatch, race)
    real_build = estimator_module.estimator_build

    def build(**kw):
        if kw["half"]:
            raise RuntimeError("mkldnn bf16 path not supported")
        return real_build(**kw)

    monkeypatch.setattr(estimator_module, "estimator_build", build)
    with caplog.at_level(logging.WARNING, logger="inference.estimator"):
        first = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
        again = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert first is again and (first.runtime, first.dtype_name) == ("onnx", "float32") and race.calls == []
    said = [r.getMessage() for r in caplog.records if "DEPTHSITE_FP16" in r.getMessage()]
    assert said == ["DEPTHSITE_FP16: MiDaS_small runs in float32: its bfloat16 network failed (RuntimeError: mkldnn "
                    "bf16 path not supported)"]
    # The weight file is fine: float32 runs it, and it was not marked corrupt.
    cached_small.refresh_from_db()
    assert cached_small.health != "corrupt"


def test_the_bfloat16_network_gets_the_configured_threads(settings, cached_small, pool, monkeypatch):
    from inference.runtime import eager

    order = []
    monkeypatch.setattr(eager, "configure_threads", lambda: order.append("threads"))
    real_build = estimator_module.estimator_build
    monkeypatch.setattr(estimator_module, "estimator_build",
                        lambda **kw: order.append(f"build half={kw['half']}") or real_build(**kw))
    with_amx(monkeypatch, Race(0.1, 0.3))
    pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert order.index("threads") < order.index("build half=True")


def test_a_process_running_a_few_images_does_not_pay_for_the_race(settings, cached_small, pool, caplog,
                                                                 monkeypatch):
    race = Race(0.1, 0.3)
    with_amx(monkeypatch, race)
    pool.expect_runs(estimator_module.HALF_FROM_RUNS - 1)
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        estimator = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert (estimator.runtime, estimator.dtype_name) == ("onnx", "float32") and race.calls == []
    few = estimator_module.HALF_FROM_RUNS - 1
    assert any(f"DEPTHSITE_FP16 is not used for {few} image(s) a model" in r.getMessage() for r in caplog.records)
    pool.expect_runs(estimator_module.HALF_FROM_RUNS)
    assert pool_warm(pool, "MiDaS_small", device="cpu", half=True).dtype_name == "bfloat16"


def test_without_amx_fp16_imports_no_torch_in_an_onnx_process(settings, cached_small, monkeypatch):
    pool_warm(EstimatorPool(capacity=1), "MiDaS_small", device="cpu")  # the artifact, built with torch
    monkeypatch.setattr(estimator_module, "bf16_units", lambda: None)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` from here on raises ImportError
    pool = EstimatorPool(capacity=1)
    try:
        estimator = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
        assert (estimator.runtime, estimator.dtype_name) == ("onnx", "float32")
        estimator.predict(synthetic_image(32, 48))
    finally:
        pool.clear()


@pytest.mark.slow
def test_bfloat16_estimator_predicts_close_to_float32(settings, cached_small, pool, monkeypatch):
    """The real bfloat16 network against float32, then a real race (no stand-in but the CPU's flags)."""
    import torch

    settings.DEPTHSITE_RUNTIME = "eager"
    image = synthetic_image(96, 128)
    full = pool_warm(EstimatorPool(capacity=1), "MiDaS_small", device="cpu", half=False).predict(image)
    half = estimator_module.estimator_build(model=cached_small.model, weight_file=cached_small,
                                            device=torch.device("cpu"), half=True, compile=False)
    result = half.predict(image)
    assert result.dtype == "bfloat16" and result.depth.dtype == np.float32
    assert result.depth.shape == full.depth.shape == (96, 128)
    # bfloat16 keeps 8 bits of mantissa: MiDaS_small's map measured 1.5e-2 of its range off float32's.
    assert relative_error(result.depth, full.depth) < 5e-2
    # A real race on this CPU: whichever wins, what runs is what was decided. Where the CPU has no bf16 units it
    # races at a 64 x 64 network input: at MiDaS_small's own 256 its six forwards took 45 s of this test's 57 on
    # an AVX2 machine that emulates bfloat16, and float32 wins there at any size.
    import dataclasses

    from inference.runtime import eager

    emulated = cpu.bf16_units() is None
    if emulated:
        real_config = eager.get_config
        small = dataclasses.replace(real_config("MiDaS_small"), net_size=(64, 64))
        monkeypatch.setattr(eager, "get_config", lambda name: small if name == "MiDaS_small" else real_config(name))
    with_amx(monkeypatch)
    chosen = pool_warm(pool, "MiDaS_small", device="cpu", half=True)
    assert chosen.config.net_size == ((64, 64) if emulated else (256, 256))
    assert chosen.dtype_name == pool._half_choices[("MiDaS_small", cached_small.sha256)]


def test_forward_race_times_both_after_an_untimed_run():
    calls = []

    def stand_in(name: str, seconds: float):
        def predict(image):
            assert image.shape == (32, 48, 3) and image.dtype == np.uint8
            calls.append(name)
            time.sleep(seconds)
        return SimpleNamespace(config=SimpleNamespace(net_size=(32, 48)), predict=predict)

    slow, fast = forward_race(stand_in("slow", 0.03), stand_in("fast", 0.0), runs=2)
    assert calls == ["slow", "fast", "slow", "fast", "slow", "fast"]
    assert slow >= 0.03 > fast
