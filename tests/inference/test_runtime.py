"""The ONNX runtime path: artifacts built, checked, recorded and keyed by the weights' digest; eager fallback."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.support.estimators import pool_warm
from inference.estimator import EstimatorPool
from inference.runtime import artifacts, runtime_select
from inference.runtime.export import export_recipe
from inference.runtime.pack import pack_read
from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import WeightFileError
from inference.exceptions import RuntimeArtifactError
from models_registry.formats import file_sha256
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.cache import cache_optimize_execute, cache_optimize_plan
from models_registry.services.imports import weight_import
from models_registry.services.verify import weight_verify
from models_registry.detweights import synthetic_image

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_runtime_state")]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


def relative_error(candidate: np.ndarray, golden: np.ndarray) -> float:
    return float(np.abs(candidate.astype(np.float64) - golden).max() / (golden.max() - golden.min()))


SMALL_RECIPE = export_recipe("MiDaS_small")  # the recipe MiDaS_small's artifacts are built by in this release


def artifact_row(model_name: str = "MiDaS_small") -> WeightFile | None:
    return WeightFile.objects.filter(model__name=model_name, format="onnx").first()


def fake_artifact(model: RegisteredModel, source: WeightFile, size: int = 4096,
                  recipe: int = SMALL_RECIPE) -> WeightFile:
    """An artifact row and file without an export: enough for what the registry does with it."""
    path = artifacts.runtime_artifact_path(model=model)
    path.write_bytes(bytes(range(256)) * (size // 256))
    return WeightFile.objects.create(model=model, format="onnx", path=cachefs.relative(path), size=path.stat().st_size,
                                     sha256=file_sha256(path), content_digest=source.content_digest,
                                     health=Health.OK, node=cachefs.node_name(), origin="build",
                                     export_recipe=recipe)


# --- choosing the runtime ------------------------------------------------------------------------


def test_runtime_select_follows_the_setting_and_the_device(settings):
    settings.DEPTHSITE_RUNTIME = "eager"
    assert runtime_select(device="cpu") == "eager"
    settings.DEPTHSITE_RUNTIME = "onnx"
    assert runtime_select(device="cpu") == "onnx"
    assert runtime_select(device="cuda") == "eager"
    settings.DEPTHSITE_RUNTIME = "auto"
    assert runtime_select(device="cpu") == "onnx"


def test_missing_onnxruntime_means_eager_said_once(settings, monkeypatch, caplog, cached_small, pool):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        assert runtime_select(device="cpu") == "eager"
        estimator = pool_warm(pool, "MiDaS_small")
        pool_warm(pool, "MiDaS_small")
    assert estimator.runtime == "eager"
    assert [r.message for r in caplog.records].count(
        "onnxruntime is not installed: models run in eager PyTorch "
        "(pip install -r requirements.txt for the faster CPU runtime)") == 1
    assert artifact_row() is None


def test_an_onnxruntime_too_old_for_packed_artifacts_means_eager_said_once(monkeypatch, caplog):
    # 1.19 and 1.20 cannot open an artifact whose graph is handed over as bytes with its weights beside it.
    import types

    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", types.SimpleNamespace(__version__="1.20.1"))
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        assert runtime_select(device="cpu") == "eager"
        assert runtime_select(device="cpu") == "eager"
    said = [r.getMessage() for r in caplog.records if "older than" in r.getMessage()]
    assert said == ["onnxruntime 1.20 is older than 1.21, the first that opens depthsite's artifacts: models run "
                    "in eager PyTorch (pip install -r requirements.txt)"]
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", types.SimpleNamespace(__version__="1.21.0"))
    assert runtime_select(device="cpu") == "onnx"


# --- numpy twin of the transforms ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MiDaS_small", "DPT_Hybrid", "Depth_Anything_V2_Small", "DPT_SwinV2_T_256"])
def test_numpy_transforms_match_the_torch_ones(name):
    import torch

    from inference.nets import transforms as torch_transforms
    from inference.runtime import transforms as numpy_transforms

    for height, width in ((240, 320), (500, 375), (97, 203)):
        image = synthetic_image(height, width)
        expected = torch_transforms.preprocess(image, name).numpy()
        got = numpy_transforms.preprocess(image, name)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-6
        # A smooth prediction, as networks give: float32 rounding only, well inside the 2e-5 budget.
        rows, cols = np.meshgrid(np.linspace(0, 3, got.shape[2]), np.linspace(0, 2, got.shape[3]), indexing="ij")
        prediction = (np.sin(rows) * np.cos(cols) * 40 + 100).astype(np.float32)[None]
        back = torch_transforms.postprocess(torch.from_numpy(prediction), (height, width), name)
        assert relative_error(numpy_transforms.postprocess(prediction, (height, width), name), back) <= 5e-6


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_in_blocks_and_from_uint8_gives_the_same_pixels(monkeypatch, mode):
    from inference.runtime import transforms as numpy_transforms

    pixels = synthetic_image(61, 83).transpose(2, 0, 1)  # uint8 (3, H, W), a strided view
    as_float = pixels.astype(np.float64)
    for size in ((37, 45), (130, 170)):  # down and up
        whole = numpy_transforms.resize(pixels, size, mode=mode)
        whole_float = numpy_transforms.resize(as_float, size, mode=mode)
        assert whole.shape == (3, *size) and whole.dtype == np.float64
        # Summed in float64 either way; only the order of a few additions may differ.
        assert np.abs(whole - whole_float).max() <= 1e-10
        monkeypatch.setattr(numpy_transforms, "GATHER_CHUNK", 500)  # many blocks, a ragged last one
        # Every output row written (np.empty holds garbage otherwise), by the same taps and weights (einsum's
        # loop, and so the order of a few additions, may change with a block's shape).
        assert np.abs(numpy_transforms.resize(pixels, size, mode=mode) - whole).max() <= 1e-10
        assert np.abs(numpy_transforms.resize(as_float, size, mode=mode) - whole_float).max() <= 1e-10
        monkeypatch.undo()


@pytest.mark.parametrize("threads", [2, 3])
def test_resize_split_across_threads_gives_the_same_values(monkeypatch, threads):
    """Workers resize with as many threads as their forward uses. A block is the same computation in any
    thread; only its shape changes with the thread count, which may change the order of a few additions
    (as GATHER_CHUNK's blocks always could), far below float32's resolution."""
    from inference.runtime import transforms as numpy_transforms

    monkeypatch.setattr(numpy_transforms, "THREADED_FROM_TAPS", 0)  # small inputs threaded too
    ran_in = set()
    real_einsum = np.einsum

    def einsum(*args, **kwargs):
        ran_in.add(threading.current_thread().name)
        return real_einsum(*args, **kwargs)

    monkeypatch.setattr(numpy_transforms.np, "einsum", einsum)
    image = synthetic_image(61, 83)
    for name in ("MiDaS_small", "Depth_Anything_V2_Small"):  # bicubic half-pixel, bilinear aligned
        one = numpy_transforms.preprocess(image, name)
        assert relative_error(numpy_transforms.preprocess(image, name, threads=threads), one) <= 1e-7
        prediction = one[0, :1] + 3
        for size in ((61, 83), (7, 300)):  # more threads than some passes have rows
            expected = numpy_transforms.postprocess(prediction, size, name)
            got = numpy_transforms.postprocess(prediction, size, name, threads=threads)
            assert relative_error(got, expected) <= 1e-6
    assert any(name.startswith("depthsite-resize") for name in ran_in)  # the pool did passes
    assert numpy_transforms.resize_threads(3) == 3 and numpy_transforms.resize_threads(64) == 4
    assert 1 <= numpy_transforms.resize_threads(0) <= 4
    assert numpy_transforms._threads_for(1 << 20, 64) == numpy_transforms.MAX_RESIZE_THREADS  # resize(threads=64)


def test_a_forked_child_resizes_on_threads_of_its_own(monkeypatch):
    # django-q2 forks its workers. The child gets the parent's pools without their threads, and the pools' lock
    # as it was at the fork: here held, as when another thread was making a pool. It must still resize.
    import signal

    from inference.runtime import transforms as numpy_transforms

    monkeypatch.setattr(numpy_transforms, "THREADED_FROM_TAPS", 0)
    pixels = synthetic_image(40, 50)
    expected = numpy_transforms.resize(pixels.transpose(2, 0, 1).astype(np.float32), (20, 30), mode="bilinear",
                                       threads=2)  # the parent's pool exists
    with numpy_transforms._pools_lock:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 3
            try:
                signal.alarm(20)  # a child stuck on the inherited lock dies instead of hanging the suite
                got = numpy_transforms.resize(pixels.transpose(2, 0, 1).astype(np.float32), (20, 30),
                                              mode="bilinear", threads=2)
                code = 0 if np.array_equal(got, expected) else 1
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- the registry's side, without an export ----------------------------------------------------------


def test_an_onnx_file_is_never_imported(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "midas_v21_small_256.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(WeightFileError):
        weight_import(path=path, model_name="MiDaS_small")
    assert not WeightFile.objects.exists()


def test_budget_pruning_removes_artifacts_and_weights_resolution_ignores_them(cached_small):
    model = cached_small.model
    artifact = fake_artifact(model, cached_small)
    from models_registry.selectors import weight_files_usable

    assert [f.format for f in weight_files_usable(model=model)] == ["pt"]
    plan = cache_optimize_plan(max_bytes=1)
    evicted = {item.format for item in plan.items if item.kind == "evict"}
    assert "onnx" in evicted
    cache_optimize_execute(plan=plan)
    assert not WeightFile.objects.filter(pk=artifact.pk).exists()
    assert not artifacts.runtime_artifact_path(model=model).exists()


def test_verify_checks_an_artifacts_bytes(cached_small):
    artifact = fake_artifact(cached_small.model, cached_small)
    assert weight_verify(weight_file=artifact).health == Health.OK
    path = cachefs.absolute(artifact.path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert weight_verify(weight_file=artifact).health == Health.CORRUPT
    # A damaged artifact is never served for its weights.
    assert artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small) is None


def test_an_artifact_of_another_export_recipe_is_not_served(cached_small, caplog):
    # An artifact built by a release with an earlier recipe (before BEiT's attention was fused, say) would run
    # slower than a rebuild, or compute otherwise: not found, so the next use builds the release's own.
    def find(**options) -> WeightFile | None:
        return artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small, **options)

    artifact = fake_artifact(cached_small.model, cached_small, recipe=0)  # a row from before recipes were recorded
    with caplog.at_level(logging.INFO, logger="inference.runtime.artifacts"):
        assert find() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"the ONNX artifact of MiDaS_small was built by export recipe 0, this release's is {SMALL_RECIPE}: "
        "it is rebuilt"]
    assert find(earlier_recipe=True) == artifact  # what a failed rebuild falls back to
    WeightFile.objects.filter(pk=artifact.pk).update(export_recipe=SMALL_RECIPE)
    assert find() == artifact
    # A later release's (on the same node during a rolling deploy, or the one rolled back from) was checked against
    # another release's code: rebuilt too, even where a rebuild fails.
    WeightFile.objects.filter(pk=artifact.pk).update(export_recipe=SMALL_RECIPE + 1)
    assert find() is None and find(earlier_recipe=True) is None


def test_a_recipe_rebuilds_the_artifacts_of_the_families_it_changed_only(cached_small, monkeypatch):
    # Recipe 2 changed SwinV2's graphs alone: the artifacts of every other family, built by recipe 1, are kept.
    from inference.runtime import export

    assert [export_recipe(name) for name in ("MiDaS_small", "DPT_Large", "DPT_Swin_L_384", "Depth_Anything_V2_Small",
                                             "DPT_SwinV2_T_256", "DPT_SwinV2_B_384", "DPT_SwinV2_L_384")] == \
        [1, 1, 1, 1, 2, 2, 2]
    artifact = fake_artifact(cached_small.model, cached_small, recipe=1)
    assert artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small) == artifact
    # A later recipe that changes MiDaS v2.1's graphs makes this one an earlier recipe's, rebuilt on next use.
    monkeypatch.setattr(export, "RECIPES", export.RECIPES + ((3, frozenset({"midas_v21"})),))
    assert export_recipe("MiDaS_small") == 3 and export_recipe("DPT_SwinV2_T_256") == 2
    assert artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small) is None
    assert artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small,
                                           earlier_recipe=True) == artifact


def test_an_artifact_is_hashed_again_only_when_its_inode_changed_after_it_was_hashed(cached_small, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    artifact = fake_artifact(cached_small.model, cached_small)
    from models_registry.services import verify

    hashed = []
    monkeypatch.setattr(verify, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))

    def find() -> WeightFile | None:
        return artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small)

    # Never hashed since it was recorded: hashed.
    assert find() == artifact and len(hashed) == 1
    # Hashed well after its last change: trusted without reading its bytes.
    WeightFile.objects.filter(pk=artifact.pk).update(verified_at=timezone.now() + timedelta(seconds=60))
    assert find() == artifact and len(hashed) == 1
    # Overwritten in place, same size, after it was last hashed: hashed, found damaged, never served.
    WeightFile.objects.filter(pk=artifact.pk).update(verified_at=timezone.now() - timedelta(hours=1))
    path = cachefs.absolute(artifact.path)
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))
    assert find() is None and len(hashed) == 2
    artifact.refresh_from_db()
    assert artifact.health == Health.CORRUPT


def test_an_artifact_found_intact_by_hashing_is_not_hashed_again_at_the_next_lookup(cached_small, monkeypatch):
    # The lookup used to hash without recording it: an artifact renamed into place moments before its record
    # was written stayed "changed since hashed" for ever, and DPT_Large's 1.37 GB were read at every open.
    from models_registry.services import verify

    artifact = fake_artifact(cached_small.model, cached_small)
    WeightFile.objects.filter(pk=artifact.pk).update(verified_at=None)
    monkeypatch.setattr(verify, "CTIME_MARGIN_S", 0.0)  # as if the kernel's clock were exact
    hashed = []
    monkeypatch.setattr(verify, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))

    def find() -> WeightFile | None:
        return artifacts.runtime_artifact_find(model=cached_small.model, weight_file=cached_small)

    assert find() == artifact and len(hashed) == 1
    artifact.refresh_from_db()
    assert artifact.verified_at is not None
    assert find() == artifact and find() == artifact and len(hashed) == 1


@pytest.mark.parametrize("other_built", [True, False])
def test_a_build_waits_for_another_process_building_the_same_model_and_uses_its_artifact(cached_small, monkeypatch,
                                                                                         other_built):
    # Two workers meeting the same missing artifact: the second waits on the model's build lock, then finds
    # the first one's artifact instead of exporting it again (or builds, when the first made none).
    import contextlib

    exports = []

    class Exported(Exception):
        pass

    def export(*args):
        exports.append(args)
        raise Exported  # far enough: the point is whether an export started

    monkeypatch.setattr(artifacts, "network_export", export)
    locks = []
    real_locked = cachefs.locked

    @contextlib.contextmanager
    def held_by_another(name, timeout=600, on_wait=None):
        locks.append(name)
        if name != artifacts.build_lock_name(cached_small.model):
            with real_locked(name, timeout, on_wait=on_wait) as waited:
                yield waited
            return
        if other_built:  # what the other process recorded while this one waited
            fake_artifact(cached_small.model, cached_small)
        yield True

    monkeypatch.setattr(artifacts.cachefs, "locked", held_by_another)
    if other_built:
        found = artifacts.runtime_artifact_build(model=cached_small.model, weight_file=cached_small)
        assert found == artifact_row() and exports == []
    else:
        with pytest.raises(RuntimeArtifactError):
            artifacts.runtime_artifact_build(model=cached_small.model, weight_file=cached_small)
        assert len(exports) == 1
    assert locks[0] == "MiDaS_small.build"


# --- built, checked and used (real exports of MiDaS_small) ---------------------------------------------


@pytest.mark.slow
def test_artifact_is_built_recorded_and_matches_eager(cached_small, pool):
    estimator = pool_warm(pool, "MiDaS_small")
    assert estimator.runtime == "onnx"
    artifact = artifact_row()
    path = cachefs.absolute(artifact.path)
    assert artifact.health == Health.OK and artifact.origin == "build"
    assert artifact.size == path.stat().st_size and artifact.sha256 == file_sha256(path)
    assert artifact.content_digest == cached_small.content_digest
    assert "checked against eager at 256x256, 224x256, 256x320" in artifact.health_reason  # an odd multiple of 32 too
    assert not list(path.parent.glob(f"{cachefs.TEMP_PREFIX}*"))  # no half-written file or folder left beside it
    packed = pack_read(path)  # one file: the graph, and its weights as external data in the same file
    assert packed is not None and len(packed.graph) < artifact.size // 20
    for height, width in ((240, 320), (500, 375)):
        result = estimator.predict(synthetic_image(height, width))
        golden = np.load(FIXTURES / f"e2e_MiDaS_small_{height}x{width}.npy")
        assert result.depth.shape == (height, width) and result.depth.dtype == np.float32
        assert result.runtime == "onnx" and result.weights_sha256 == cached_small.sha256
        assert relative_error(result.depth, golden) <= 2e-5
    assert pool_warm(pool, "MiDaS_small") is estimator


@pytest.mark.slow
def test_artifact_is_keyed_by_the_weights_digest(cached_small, small_arrays, write_checkpoint, pool):
    first = pool_warm(pool, "MiDaS_small")
    old = artifact_row()
    other = {key: (value * np.float32(0.5) if key.endswith("output_conv.4.weight") else value)
             for key, value in small_arrays.items()}
    replaced = weight_import(path=write_checkpoint("pt", name="other.pt", arrays=other), model_name="MiDaS_small",
                             pin=False).weight_file
    assert replaced.content_digest != old.content_digest
    assert artifacts.runtime_artifact_find(model=replaced.model, weight_file=replaced) is None
    second = pool_warm(pool, "MiDaS_small")
    assert second is not first and second.runtime == "onnx" and second.weights_sha256 == replaced.sha256
    new = artifact_row()
    assert new.content_digest == replaced.content_digest and new.sha256 != old.sha256
    image = synthetic_image(96, 128)
    assert not np.allclose(first.predict(image).depth, second.predict(image).depth)


@pytest.mark.slow
def test_an_artifact_of_an_earlier_export_recipe_is_rebuilt_or_kept_where_the_rebuild_fails(cached_small, pool,
                                                                                            monkeypatch, caplog):
    from inference import estimator as estimator_module

    first = pool_warm(pool, "MiDaS_small")
    built = artifact_row()
    assert first.runtime == "onnx" and built.export_recipe == SMALL_RECIPE
    WeightFile.objects.filter(pk=built.pk).update(export_recipe=0)  # as an earlier release recorded it
    # This release's export fails: the earlier artifact still serves the weights, in this process from now on.
    exports = []

    def failing_export(*args, **kwargs):
        exports.append(args)
        raise RuntimeError("an exporter bug")

    real_export = artifacts.network_export
    monkeypatch.setattr(artifacts, "network_export", failing_export)
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        kept = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
        again = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
    assert kept.runtime == "onnx" and again.runtime == "onnx" and len(exports) == 1
    said = [r.getMessage() for r in caplog.records if "keeps its ONNX artifact" in r.getMessage()]
    assert said == ["MiDaS_small keeps its ONNX artifact of export recipe 0: building this release's failed "
                    "(exporting MiDaS_small to ONNX failed: an exporter bug)"]
    assert artifact_row().export_recipe == 0 and artifact_row().sha256 == built.sha256
    # The next process (the set of kept artifacts is its own) builds again, and records this release's recipe.
    monkeypatch.setattr(artifacts, "network_export", real_export)
    estimator_module._kept_older_recipe.clear()
    rebuilt_by = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
    rebuilt = artifact_row()
    assert rebuilt_by.runtime == "onnx" and rebuilt.pk == built.pk and rebuilt.export_recipe == SMALL_RECIPE
    assert rebuilt.created_at > built.created_at and cachefs.absolute(rebuilt.path).is_file()


@pytest.mark.slow
def test_damaged_or_missing_artifact_is_detected_and_rebuilt(cached_small, caplog):
    pool = EstimatorPool(capacity=2)
    pool_warm(pool, "MiDaS_small")
    pool.clear()
    artifact = artifact_row()
    path = cachefs.absolute(artifact.path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = pool_warm(EstimatorPool(capacity=2), "MiDaS_small")
    assert rebuilt.runtime == "onnx"
    assert any("marked corrupt" in r.message for r in caplog.records)
    artifact.refresh_from_db()
    assert artifact.health == Health.OK and artifact.sha256 == file_sha256(path)
    path.unlink()
    again = pool_warm(EstimatorPool(capacity=2), "MiDaS_small")
    assert again.runtime == "onnx" and path.exists()


@pytest.mark.parametrize("exit_code, stderr, said", [
    (1, "Traceback ...\nthe ONNX artifact of MiDaS_small differs from eager by 1.00e-03\n",
     "differs from eager by 1.00e-03"),
    (0, "", "the build process recorded no usable ONNX artifact of MiDaS_small"),
])
def test_a_child_build_that_made_no_artifact_falls_back_to_eager_said_once(cached_small, settings, monkeypatch,
                                                                          caplog, pool, exit_code, stderr, said):
    import subprocess

    from inference.runtime import build_process

    settings.DEPTHSITE_RUNTIME_BUILD = "process"
    calls = []

    def child(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, exit_code, stdout="", stderr=stderr)

    monkeypatch.setattr(build_process.subprocess, "run", child)
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        first = pool_warm(pool, "MiDaS_small")
        second = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
    assert first.runtime == "eager" and second.runtime == "eager"
    assert calls == [[build_process.sys.executable, "-m", "inference.runtime.build_process", str(cached_small.pk)]]
    fallbacks = [r.getMessage() for r in caplog.records if "runs in eager PyTorch" in r.getMessage()]
    assert len(fallbacks) == 1 and said in fallbacks[0]
    assert artifact_row() is None


@pytest.mark.slow
def test_artifact_failing_its_check_falls_back_to_eager_said_once(cached_small, monkeypatch, caplog, pool):
    real_compare = artifacts.artifact_compare

    def off_by_a_lot(network, config, path):
        check = real_compare(network, config, path)
        check.worst = 1e-3
        return check

    monkeypatch.setattr(artifacts, "artifact_compare", off_by_a_lot)
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        first = pool_warm(pool, "MiDaS_small")
        second = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
    assert first.runtime == "eager" and second.runtime == "eager"
    fallbacks = [r for r in caplog.records if "runs in eager PyTorch" in r.message]
    assert len(fallbacks) == 1 and "differs from eager by 1.00e-03" in fallbacks[0].getMessage()
    assert artifact_row() is None
    assert not list(artifacts.runtime_artifact_path(model=cached_small.model).parent.glob("*.onnx"))


# --- every family, at sizes other than the export size ---------------------------------------------


def first_blocks_tapped(network) -> int:
    """Make a ViT, BEiT or DINOv2 network tap its first blocks instead of its last; the number of blocks it now runs.

    The encoders run their blocks up to the last one they tap, so the network is the same everywhere but for how
    deep its transformer goes: the same patch and position-table code, the same blocks, the same decoder."""
    import dataclasses

    if hasattr(network, "taps"):  # Depth Anything V2
        network.taps = tuple(range(len(network.taps)))
        return len(network.taps)
    encoder = network.pretrained
    encoder.cfg = dataclasses.replace(encoder.cfg, block_taps=tuple(range(len(encoder.cfg.block_taps))))
    return len(encoder.cfg.block_taps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DPT_Hybrid", "DPT_BEiT_B_384", "Depth_Anything_V2_Small"])
def test_vit_family_artifacts_hold_at_portrait_and_landscape_sizes(tmp_path, name):
    # The ViT (DPT), BEiT and DINOv2 encoders resize position tables by the input's shape. Exported from the
    # native square, the graph must resize them for the other check sizes as eager does (inference/nets/resample).
    # The blocks past the first few only repeat them in the graph: tapping the first ones runs 2 (DPT_Hybrid) or 4
    # of the 12 blocks, and the three cases take 80 s instead of 129 s on one core (Zen 3, 2026-12-07). At full
    # depth they passed too, with 12 fused attentions each.
    from inference.nets import create_model, get_config
    from inference.runtime.export import check_shapes, network_export
    from models_registry.detweights import det_state_dict

    network = create_model(name, state_dict=det_state_dict(name)).eval()
    blocks = first_blocks_tapped(network)
    config = get_config(name)
    path = tmp_path / "a.onnx"
    network_export(network, config, path)
    check = artifacts.artifact_compare(network, config, path)
    assert len(check_shapes(config)) == 3 and check.shapes == check_shapes(config)
    assert check.worst <= artifacts.TOLERANCE
    # ViT, DINOv2 and BEiT attention runs as ONNX Runtime's fused MultiHeadAttention, one per block (BEiT's
    # relative position bias as its attention_bias).
    import onnx

    ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    assert blocks == {"DPT_Hybrid": 2}.get(name, 4)
    assert ops.count("MultiHeadAttention") == blocks and ops.count("Softmax") == 0


@pytest.mark.slow
def test_a_swinv2_artifact_scales_its_queries_and_matches_eager(tmp_path):
    # SwinV2's cosine attention as timm writes it (recipe 2): each block's per-head scale multiplies the queries
    # rather than its (N, N) scores, and no normalising Expand is left; the artifact still passes its check.
    import onnx

    from inference.nets import create_model, get_config
    from inference.runtime.export import network_export
    from models_registry.detweights import det_state_dict

    name = "DPT_SwinV2_T_256"
    network = create_model(name, state_dict=det_state_dict(name)).eval()
    config = get_config(name)
    path = tmp_path / "a.onnx"
    network_export(network, config, path)
    check = artifacts.artifact_compare(network, config, path)
    assert check.shapes == [(256, 256)] and check.worst <= artifacts.TOLERANCE
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    blocks = sum(len(layer.blocks) for layer in network.pretrained.model.layers)
    assert blocks == 12 and sum(node.name.endswith("/on_query") for node in nodes) == blocks
    assert [node.op_type for node in nodes].count("Expand") == 0


def test_the_artifact_check_runs_on_the_configured_threads(settings, monkeypatch, tmp_path):
    # An operator who gives the network one thread gets one for the build's check too, not every core.
    from inference.runtime import onnx as onnx_runtime

    opened = []

    def session_open(path, threads=0, **options):
        opened.append(threads)
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nmore")

    settings.DEPTHSITE_TORCH_THREADS = 1
    monkeypatch.setattr(onnx_runtime, "session_open", session_open)
    # A graph ONNX Runtime cannot load is a failed check (the model runs eager), not a crash of the request.
    with pytest.raises(RuntimeArtifactError) as refused:
        artifacts.artifact_compare(None, None, tmp_path / "a.onnx")
    assert opened == [1]
    assert refused.value.message == ("ONNX Runtime cannot open the exported graph: [ONNXRuntimeError] : 1 : FAIL : "
                                     "Load model failed")
    monkeypatch.setattr(onnx_runtime, "session_open", lambda path, threads=0, **options: (_ for _ in ()).throw(
        MemoryError()))  # an error with no text
    with pytest.raises(RuntimeArtifactError) as refused:
        artifacts.artifact_compare(None, None, tmp_path / "a.onnx")
    assert refused.value.message == "ONNX Runtime cannot open the exported graph: MemoryError"


def test_an_artifact_that_fails_at_another_input_size_is_a_failed_check_not_a_crash(tmp_path):
    # A graph exported with a fixed input shape: at the second, non-square check size ONNX Runtime raises its
    # own error. That must read as "no artifact" (eager runs), never escape.
    import torch

    from inference.nets import create_model, get_config
    from models_registry.detweights import det_state_dict

    name = "MiDaS_small"
    network = create_model(name, state_dict=det_state_dict(name)).eval()
    config = get_config(name)
    path = tmp_path / "fixed.onnx"
    height, width = config.net_size
    with torch.no_grad():
        torch.onnx.export(network, (torch.zeros(1, 3, height, width),), str(path), dynamo=False,
                          input_names=["image"], output_names=["depth"])
    with pytest.raises(RuntimeArtifactError, match="does not run at"):
        artifacts.artifact_compare(network, config, path)
