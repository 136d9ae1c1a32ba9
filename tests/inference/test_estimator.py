"""The registry-backed estimator: faithful output, zero-copy loading, a warm thread-safe LRU pool, clear errors."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import estimator as estimator_module
from tests.support.estimators import RowStub, pool_warm
from tests.nets.fidelity import relative_error
from inference.worker import worker_id
from inference.estimator import EstimatorPool, estimator_get
from inference.exceptions import InferenceError
from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import OfflineError, WeightFileError
from models_registry.models import RegisteredModel, WarmModel, WeightFile
from models_registry.selectors import warm_models
from models_registry.services.export import weight_convert
from models_registry.services.imports import weight_import
from models_registry.services.verify import weight_verify
from models_registry.detweights import synthetic_image

pytestmark = pytest.mark.django_db
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


@pytest.mark.slow
def test_prediction_matches_the_official_end_to_end_output(cached_small, pool):
    estimator = pool_warm(pool, "MiDaS_small")
    for height, width in ((240, 320), (500, 375)):
        result = estimator.predict(synthetic_image(height, width))
        golden = np.load(FIXTURES / f"e2e_MiDaS_small_{height}x{width}.npy")
        assert result.depth.shape == (height, width) and result.depth.dtype == np.float32
        assert relative_error(result.depth, golden) <= 2e-5


@pytest.mark.slow
def test_result_describes_itself(cached_small, pool):
    result = pool_warm(pool, "midas_small").predict(synthetic_image(240, 320))
    assert result.model == "MiDaS_small"
    assert result.weights_sha256 == cached_small.sha256 and result.weights_format == "pt"
    assert result.depth_min == pytest.approx(float(result.depth.min()))
    assert result.depth_max == pytest.approx(float(result.depth.max()))
    assert "inverse depth" in result.semantics
    assert result.preprocessing["network_input"] == [192, 256]
    assert result.preprocessing["resize_method"] == "upper_bound"
    assert result.device == "cpu" and result.dtype == "float32" and result.inference_ms > 0


def test_weights_are_assigned_without_a_copy(cached_small, pool, monkeypatch):
    seen = {}
    from inference.runtime import eager

    real_create = eager.create_model

    def spy(name, *, state_dict=None, device="cpu"):
        seen.update(state_dict)
        return real_create(name, state_dict=state_dict, device=device)

    monkeypatch.setattr(eager, "create_model", spy)
    estimator = pool_warm(pool, "MiDaS_small")
    parameters = dict(estimator.network.named_parameters())
    key = "scratch.output_conv.0.weight"
    assert parameters[key].data_ptr() == seen[key].data_ptr()
    assert not any(p.is_meta for p in estimator.network.parameters())
    assert not any(b.is_meta for b in estimator.network.buffers())


def test_pool_keeps_estimators_warm_and_marks_weights_used(cached_small, pool):
    first = pool_warm(pool, "MiDaS_small")
    second = pool_warm(pool, "MIDAS_SMALL")
    assert first is second
    cached_small.refresh_from_db()
    assert cached_small.last_used_at is not None
    warm = list(warm_models())
    assert [(w.model.name, w.device, w.dtype, w.weights_sha256) for w in warm] == [
        ("MiDaS_small", "cpu", "float32", cached_small.sha256)]
    assert warm[0].worker == worker_id()


@pytest.mark.slow
def test_pool_evicts_the_least_recently_used(cached_small, small_pt):
    for name in ("small_a", "small_b"):
        RegisteredModel.objects.create(name=name, display_name=name, architecture="MiDaS_small",
                                       file_name=f"{name}.pt", input_size=256)
        weight_import(path=small_pt, model_name=name)
    pool = EstimatorPool(capacity=2)
    try:
        a = pool_warm(pool, "small_a")
        pool_warm(pool, "small_b")
        assert pool_warm(pool, "small_a") is a  # a is now the most recent
        pool_warm(pool, "MiDaS_small")  # evicts small_b
        assert sorted(entry["model"] for entry in pool.warm()) == ["MiDaS_small", "small_a"]
        assert sorted(WarmModel.objects.values_list("model__name", flat=True)) == ["MiDaS_small", "small_a"]
    finally:
        pool.clear()
    assert not WarmModel.objects.exists()


@pytest.fixture
def stub_builds(monkeypatch):
    monkeypatch.setattr(estimator_module, "estimator_build", lambda **options: RowStub(**options))


def weights_row(model: RegisteredModel, sha256: str, fmt: str = "pt") -> WeightFile:
    return WeightFile.objects.create(model=model, format=fmt, path=f"{model.name}/{sha256[:8]}.{fmt}", size=10,
                                     sha256=sha256, node=cachefs.node_name())


def other_model(name: str) -> tuple[RegisteredModel, WeightFile]:
    model = RegisteredModel.objects.create(name=name, display_name=name, architecture="MiDaS_small",
                                           file_name=f"{name}.pt")
    return model, weights_row(model, name[-1] * 64)


def test_evicting_one_of_two_warm_weights_of_a_model_hands_its_row_to_the_other(small_model, pool, stub_builds):
    # Two weights of one model (another format, new weights) on one device and dtype share one WarmModel row.
    old_file, new_file = weights_row(small_model, "1" * 64), weights_row(small_model, "2" * 64, "h5")
    old = pool.get(model=small_model, weight_file=old_file, device="cpu")
    old_loaded_at = WarmModel.objects.get().loaded_at
    new = pool.get(model=small_model, weight_file=new_file, device="cpu")
    assert WarmModel.objects.get().weights_sha256 == new_file.sha256
    assert pool.get(model=small_model, weight_file=old_file, device="cpu") is old  # old is now the most recent
    model_a, file_a = other_model("small_a")
    pool.get(model=model_a, weight_file=file_a, device="cpu")  # capacity 2: evicts new, the least recently used
    assert new.released and not old.released
    warm = WarmModel.objects.get(model=small_model)
    assert (warm.weights_sha256, warm.weight_file, warm.load_ms, warm.bytes, warm.loaded_at) == (
        old_file.sha256, old_file, old.load_ms, old.bytes, old_loaded_at)
    assert (warm.worker, warm.device, warm.dtype) == (worker_id(), "cpu", "float32")
    model_b, file_b = other_model("small_b")
    pool.get(model=model_b, weight_file=file_b, device="cpu")  # evicts old, the last of MiDaS_small
    assert old.released
    assert sorted(WarmModel.objects.values_list("model__name", flat=True)) == ["small_a", "small_b"]


def test_a_survivor_whose_weight_file_row_went_keeps_the_row_by_its_sha256(small_model, pool, stub_builds):
    first_file, last_file = weights_row(small_model, "1" * 64), weights_row(small_model, "2" * 64, "h5")
    first = pool.get(model=small_model, weight_file=first_file, device="cpu")
    last = pool.get(model=small_model, weight_file=last_file, device="cpu")
    WeightFile.objects.filter(pk=last_file.pk).delete()  # e.g. removed from the cache while its network stays loaded
    model_a, file_a = other_model("small_a")
    pool.get(model=model_a, weight_file=file_a, device="cpu")  # evicts first, the least recently used
    assert first.released and not last.released
    warm = WarmModel.objects.get(model=small_model)
    assert (warm.weights_sha256, warm.weight_file, warm.bytes) == (last_file.sha256, None, last.bytes)


def test_a_file_row_now_naming_other_weights_is_not_put_on_the_survivors_row(small_model, pool, stub_builds):
    # A WeightFile row is updated in place when its model's weights change: it no longer names the survivor's file.
    first_file, last_file = weights_row(small_model, "1" * 64), weights_row(small_model, "2" * 64, "h5")
    pool.get(model=small_model, weight_file=first_file, device="cpu")
    last = pool.get(model=small_model, weight_file=last_file, device="cpu")
    WeightFile.objects.filter(pk=last_file.pk).update(sha256="3" * 64)
    model_a, file_a = other_model("small_a")
    pool.get(model=model_a, weight_file=file_a, device="cpu")  # evicts first
    warm = WarmModel.objects.get(model=small_model)
    assert (warm.weights_sha256, warm.weight_file) == (last.weights_sha256, None)


def test_a_database_error_while_evicting_still_releases_the_network(small_model, pool, stub_builds, monkeypatch,
                                                                     caplog):
    from django.db import OperationalError

    first = pool.get(model=small_model, weight_file=weights_row(small_model, "1" * 64), device="cpu")
    model_a, file_a = other_model("small_a")
    pool.get(model=model_a, weight_file=file_a, device="cpu")

    def locked(**_kwargs):
        raise OperationalError("database is locked")

    model_b, file_b = other_model("small_b")
    with monkeypatch.context() as patch:  # the pool fixture's own clearing at teardown must reach the database
        patch.setattr(estimator_module, "warm_model_forget", locked)
        admitted = pool.get(model=model_b, weight_file=file_b, device="cpu")  # evicts first; its row cannot go
    assert first.released and not admitted.released
    assert "could not update the warm-model row of MiDaS_small (database is locked)" in caplog.text


def test_an_estimator_evicted_before_its_row_is_written_gets_no_row(small_model, pool, stub_builds, monkeypatch):
    # Another thread's insert can evict an estimator between its own insert and its row: no row may name it then.
    real_insert = pool._insert

    def insert_then_lose(estimator, loaded_at):
        real_insert(estimator, loaded_at)
        pool._evict([estimator])

    monkeypatch.setattr(pool, "_insert", insert_then_lose)
    gone = pool.get(model=small_model, weight_file=weights_row(small_model, "1" * 64), device="cpu")
    assert gone.released and not WarmModel.objects.filter(model=small_model).exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_build_once_and_agree(cached_small, pool, monkeypatch):
    builds = []
    real_build = estimator_module.estimator_build

    def counting_build(**kwargs):
        builds.append(kwargs["model"].name)
        return real_build(**kwargs)

    monkeypatch.setattr(estimator_module, "estimator_build", counting_build)
    image = synthetic_image(96, 128)
    results, errors = [], []

    def work():
        try:
            results.append(pool_warm(pool, "MiDaS_small").predict(image).depth)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    assert builds == ["MiDaS_small"]
    for depth in results[1:]:
        np.testing.assert_array_equal(depth, results[0])


def test_a_corrupt_cached_file_is_marked_and_another_format_is_used(cached_small, pool):
    h5 = weight_convert(model=cached_small.model, fmt="h5")
    cachefs.absolute(cached_small.path).write_bytes(b"")  # damaged behind the registry's back
    estimator = pool_warm(pool, "MiDaS_small")
    assert estimator.weights_format == "h5" and estimator.weights_sha256 == h5.sha256
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT and "0 bytes" in cached_small.health_reason


def test_a_handed_file_the_network_refuses_is_a_weight_file_error(cached_small, pool, monkeypatch):
    from inference.runtime import eager

    def refuse(name, *, state_dict=None, device="cpu"):
        raise ValueError("missing key scratch.output_conv.0.weight")

    monkeypatch.setattr(eager, "create_model", refuse)
    with pytest.raises(WeightFileError, match="the network refused these weights: missing key"):
        pool.get(model=cached_small.model, weight_file=cached_small)
    assert pool.warm() == []
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK  # the pool only reports it: marking is the registry loop's part


def test_a_file_the_network_refuses_is_marked_and_the_next_file_builds(cached_small, pool, monkeypatch):
    from inference.runtime import eager

    h5 = weight_convert(model=cached_small.model, fmt="h5")
    real_create = eager.create_model
    refused = []

    def refuse_the_first(name, *, state_dict=None, device="cpu"):
        if not refused:
            refused.append(name)
            raise ValueError("unexpected key pretrained.extra")
        return real_create(name, state_dict=state_dict, device=device)

    monkeypatch.setattr(eager, "create_model", refuse_the_first)
    estimator = pool_warm(pool, "MiDaS_small")
    first = next(f for f in (cached_small, h5) if f.sha256 != estimator.weights_sha256)
    first.refresh_from_db()
    assert first.health == Health.CORRUPT and "the network refused these weights" in first.health_reason


def test_missing_weights_offline_is_a_clear_error(small_model, pool, settings):
    settings.DEPTHSITE_OFFLINE = True
    with pytest.raises(OfflineError) as caught:
        pool_warm(pool, "MiDaS_small")
    assert caught.value.extra["kind"] == "offline" and "import it" in caught.value.message


def test_device_selection_errors(cached_small, pool, settings):
    settings.DEPTHSITE_DEVICE = "tpu:7"
    with pytest.raises(InferenceError):
        pool_warm(pool, "MiDaS_small")
    if not torch.cuda.is_available():
        settings.DEPTHSITE_DEVICE = "cuda"
        with pytest.raises(InferenceError) as caught:
            pool_warm(pool, "MiDaS_small")
        assert "CUDA is not available" in caught.value.message


def test_compile_option_compiles_the_network(cached_small, pool, settings, monkeypatch):
    compiled = []

    def fake_compile(network):
        compiled.append(network)
        return network

    monkeypatch.setattr(torch, "compile", fake_compile)
    settings.DEPTHSITE_COMPILE = False
    pool_warm(pool, "MiDaS_small")
    assert compiled == []
    pool.clear()
    settings.DEPTHSITE_COMPILE = True
    estimator = pool_warm(pool, "MiDaS_small")
    assert compiled == [estimator.network]


def test_default_pool_is_shared(cached_small):
    try:
        model = cached_small.model
        assert estimator_get(model=model, weight_file=cached_small) is estimator_get(model=model,
                                                                                    weight_file=cached_small)
    finally:
        estimator_module.estimator_pool().clear()


@pytest.mark.slow
def test_functional_hash_is_the_same_for_every_format(cached_small):
    h5 = weight_convert(model=cached_small.model, fmt="h5")
    WeightFileHash = {}
    for weight_file in (cached_small, h5):
        result = weight_verify(weight_file=weight_file)
        assert result.ok
        WeightFileHash[weight_file.format] = result.weight_file.functional_hash
    assert WeightFileHash["pt"] == WeightFileHash["h5"] and len(WeightFileHash["pt"]) == 64


@pytest.mark.parametrize("sync, arranged", [(False, True), (True, False)])
def test_a_worker_arranges_to_forget_its_warm_rows_at_exit(cached_small, pool, settings, monkeypatch, sync, arranged):
    # The exit itself is proven with a real django-q2 worker in tests/jobs/test_worker_exit.py.
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": sync}
    promised = []
    monkeypatch.setattr(estimator_module, "warm_models_forget_at_exit", lambda *, worker: promised.append(worker))
    pool_warm(pool, "MiDaS_small")
    assert promised == ([worker_id()] if arranged else [])
