"""The registry's services on real files with real tensors: import, verify, convert, export, optimize, clear."""
from __future__ import annotations

import json
import os
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import (
    ConflictError,
    DigestMismatchError,
    NotFoundError,
    InvalidRequestError,
    WeightFileError,
)
from models_registry.formats import content_digest, read_weights
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import cache_info, model_get
from models_registry.services import export as export_services
from models_registry.services.cache import cache_clear, cache_optimize_execute, cache_optimize_plan
from models_registry.services.catalogue import catalogue_seed, model_pin
from models_registry.services.export import weight_convert, weight_export
from models_registry.services.imports import weight_import
from models_registry.services.records import USED_RESOLUTION, weight_mark_used
from models_registry.services.verify import weight_verify, weights_verify

pytestmark = pytest.mark.django_db


def cached_path(weight_file: WeightFile) -> Path:
    return cachefs.absolute(weight_file.path)


# --- catalogue -----------------------------------------------------------------------------------


def test_catalogue_is_seeded_once_with_the_official_files():
    catalogue_seed()
    catalogue_seed()
    names = sorted(RegisteredModel.objects.values_list("name", flat=True))
    assert {"DPT_Hybrid", "DPT_Large", "MiDaS", "MiDaS_small"} <= set(names) and len(names) == 15
    small = RegisteredModel.objects.get(name="MiDaS_small")
    assert small.file_name == "midas_v21_small_256.pt"
    assert small.source_url == "https://github.com/isl-org/MiDaS/releases/download/v2_1/midas_v21_small_256.pt"
    assert small.input_size == 256 and small.license == "MIT"
    assert "inverse depth" in small.semantics
    assert RegisteredModel.objects.get(name="DPT_Large").source_url.endswith("/v3/dpt_large_384.pt")


def test_seeding_keeps_operator_choices():
    model = RegisteredModel.objects.get(name="MiDaS")
    model.enabled, model.pinned = False, True
    model.save()
    model_pin(model=model, sha256="a" * 64)
    catalogue_seed()
    model.refresh_from_db()
    assert (model.enabled, model.pinned, model.expected_sha256) == (False, True, "a" * 64)


@pytest.mark.parametrize("name", ["MiDaS_small", "midas_small", "MIDAS_V21_SMALL_256", "midas-small"])
def test_names_are_case_insensitive_and_aliases_work(name):
    assert model_get(name=name).name == "MiDaS_small"


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(NotFoundError) as caught:
        model_get(name="midas_huge")
    assert "DPT_Large" in caught.value.message


def test_pin_rejects_a_malformed_hash():
    with pytest.raises(InvalidRequestError):
        model_pin(model=model_get(name="MiDaS"), sha256="xyz")


# --- import --------------------------------------------------------------------------------------


def test_import_identifies_the_model_by_its_key_layout(small_pt, small_arrays):
    result = weight_import(path=small_pt)

    weight_file = result.weight_file
    assert result.created
    assert weight_file.model.name == "MiDaS_small"
    assert weight_file.format == "pt" and weight_file.health == Health.OK
    assert weight_file.node == "test-node"
    assert weight_file.content_digest == content_digest(small_arrays)
    assert weight_file.functional_hash  # the network ran on the probe input
    assert cached_path(weight_file).read_bytes() == small_pt.read_bytes()
    assert weight_file.path == "MiDaS_small/midas_v21_small_256.pt"


def test_importing_identical_weights_again_changes_nothing(small_pt):
    first = weight_import(path=small_pt).weight_file
    second = weight_import(path=small_pt)
    assert not second.created
    assert "identical" in second.message
    assert second.weight_file.pk == first.pk
    assert WeightFile.objects.count() == 1


def test_import_of_unknown_layout_is_refused(write_checkpoint, small_arrays):
    arrays = dict(small_arrays)
    arrays.pop("scratch.output_conv.4.weight")
    path = write_checkpoint("pt", arrays=arrays)
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path)
    assert "key layout" in caught.value.message
    assert not WeightFile.objects.exists()


def test_import_with_model_names_what_differs(write_checkpoint, small_arrays):
    arrays = dict(small_arrays)
    arrays["scratch.output_conv.4.weight"] = np.zeros((2, 32, 1, 1), np.float32)
    path = write_checkpoint("pt", arrays=arrays)
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=path, model_name="MiDaS_small")
    assert "scratch.output_conv.4.weight" in caught.value.message and "wrong shape" in caught.value.message


@pytest.mark.slow
def test_import_refuses_when_several_models_share_the_layout(small_pt):
    RegisteredModel.objects.create(name="my_small", display_name="Fine-tuned small", architecture="MiDaS_small",
                                   file_name="my_small.pt", input_size=256)
    with pytest.raises(InvalidRequestError) as caught:
        weight_import(path=small_pt)
    assert "MiDaS_small" in caught.value.message and "my_small" in caught.value.message
    result = weight_import(path=small_pt, model_name="my_small")
    assert result.weight_file.model.name == "my_small"


def test_import_without_num_batches_tracked_is_accepted(write_checkpoint, small_arrays):
    arrays = {k: v for k, v in small_arrays.items() if not k.endswith("num_batches_tracked")}
    path = write_checkpoint("pt", arrays=arrays)
    assert weight_import(path=path).weight_file.health == Health.OK


def test_import_of_weights_that_differ_from_the_pinned_ones_is_refused(small_pt, write_checkpoint, small_arrays):
    model = model_get(name="MiDaS_small")
    model.expected_content_digest = "0" * 64
    model.save()
    with pytest.raises(DigestMismatchError) as caught:
        weight_import(path=small_pt)
    assert caught.value.extra["kind"] == "pin_differs" and caught.value.extra["model"] == "MiDaS_small"
    assert "--" not in caught.value.message  # the command line adds how to reset the pin (test_door_wording)
    assert not WeightFile.objects.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "h5", "pkl"])
def test_import_of_each_format(write_checkpoint, small_arrays, fmt):
    path = write_checkpoint(fmt, name=f"weights.{fmt}")
    weight_file = weight_import(path=path).weight_file
    assert weight_file.format == fmt and weight_file.health == Health.OK
    assert weight_file.content_digest == content_digest(small_arrays)


def test_import_detects_format_by_content_not_name(write_checkpoint):
    path = write_checkpoint("h5", name="really_h5.pt")
    weight_file = weight_import(path=path).weight_file
    assert weight_file.format == "h5"
    assert weight_file.path.endswith(".h5")


# --- verify --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_ok_records_time_and_functional_hash(cached_small):
    result = weight_verify(weight_file=cached_small)
    assert result.ok
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK and cached_small.verified_at is not None
    assert len(cached_small.functional_hash) == 64


def _damage(path: Path, kind: str, small_pt: Path) -> None:
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif kind == "html":
        path.write_text("<!DOCTYPE html><html><title>404</title></html>")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "kind,words",
    [
        ("truncated", "failed finding central directory"),
        ("lfs", "Git LFS pointer"),
        ("html", "HTML page"),
        ("empty", "empty file"),
        ("flipped", "sha256"),
    ],
)
def test_verify_names_each_classic_bad_file(cached_small, small_pt, kind, words):
    _damage(cached_path(cached_small), kind, small_pt)

    result = weight_verify(weight_file=cached_small)

    assert result.health == Health.CORRUPT
    assert words in result.reason
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT and words in cached_small.health_reason


def test_verify_flags_a_format_that_does_not_match_its_extension(cached_small, write_checkpoint):
    h5 = write_checkpoint("h5")
    cached_path(cached_small).write_bytes(h5.read_bytes())
    result = weight_verify(weight_file=cached_small)
    assert result.health == Health.CORRUPT
    assert "h5 content" in result.reason and ".pt" in result.reason


def test_verify_reports_a_missing_file(cached_small):
    cached_path(cached_small).unlink()
    result = weight_verify(weight_file=cached_small)
    assert result.health == Health.MISSING
    assert "not found" in result.reason


def test_the_quick_check_sniffs_an_unchanged_file_once_and_a_replaced_one_again(cached_small, monkeypatch,
                                                                                write_checkpoint):
    # Every job resolves its weights through the quick check: an unchanged checkpoint is not reopened each time.
    from models_registry.services import verify

    sniffed = []
    real_sniff = verify.sniff_format
    monkeypatch.setattr(verify, "sniff_format", lambda path: sniffed.append(path) or real_sniff(path))
    monkeypatch.setattr(verify, "_SNIFFED", {})
    path = cached_path(cached_small)
    # Changed a moment ago (the fixture copied it): the kernel's coarse clock could hide a second change, so it
    # is sniffed every time.
    assert verify.weight_quick_problem(cached_small, path) is None
    assert verify.weight_quick_problem(cached_small, path) is None
    assert len(sniffed) == 2
    monkeypatch.setattr(verify, "CTIME_MARGIN_S", 0.0)  # as if the copy were older than the margin
    assert verify.weight_quick_problem(cached_small, path) is None
    assert verify.weight_quick_problem(cached_small, path) is None
    assert len(sniffed) == 3
    # Replaced by another file (a new inode): sniffed again, and what it holds is seen.
    h5 = write_checkpoint("h5")
    replacement = path.with_name("replacement.tmp")
    replacement.write_bytes(h5.read_bytes())
    os.replace(replacement, path)
    health, reason = verify.weight_quick_problem(cached_small, path)
    assert len(sniffed) == 4 and health == Health.CORRUPT and "h5 content" in reason


def test_verify_catches_weights_the_network_cannot_run(cached_small, small_arrays, write_checkpoint):
    # Same layout and a consistent record, but a NaN in the weights: only running the network shows it.
    arrays = dict(small_arrays)
    arrays["scratch.output_conv.4.bias"] = np.array([np.nan], np.float32)
    nan_pt = write_checkpoint("pt", arrays=arrays, name="nan.pt")
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=nan_pt, model_name="MiDaS_small")
    assert "not finite" in caught.value.message


# --- convert -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "h5", "pkl"])
def test_convert_adds_a_copy_with_the_same_digest(cached_small, fmt):
    converted = weight_convert(model=cached_small.model, fmt=fmt)
    assert converted.format == fmt and converted.health == Health.OK
    assert converted.content_digest == cached_small.content_digest
    assert converted.functional_hash == cached_small.functional_hash
    loaded = read_weights(cached_path(converted))
    assert loaded.format == fmt
    assert content_digest(loaded.arrays) == cached_small.content_digest
    assert loaded.metadata["model"] == "MiDaS_small"
    assert weight_verify(weight_file=converted).ok


def test_convert_skips_a_source_that_fails_to_load(cached_small):
    h5 = weight_convert(model=cached_small.model, fmt="h5")
    # pt is preferred over h5 as a source; damaged behind the registry's back, it fails to load,
    # is marked corrupt with its reason, and the chain goes on to h5
    _damage(cached_path(cached_small), "empty", None)
    safetensors = weight_convert(model=cached_small.model, fmt="safetensors")
    assert safetensors.content_digest == h5.content_digest
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT
    assert "empty file" in cached_small.health_reason


def test_convert_without_cached_weights_says_so():
    with pytest.raises(NotFoundError) as caught:
        weight_convert(model=model_get(name="MiDaS_small"), fmt="h5")
    assert caught.value.message.endswith("; download or import them first")
    assert caught.value.extra == {"kind": "not_cached", "model": "MiDaS_small"}


# --- export --------------------------------------------------------------------------------------


def test_export_in_another_format_holds_the_same_weights(cached_small, tmp_path):
    output = tmp_path / "x.pkl"
    result = weight_export(model=cached_small.model, fmt="pkl", output=output)
    assert output.exists() and result.size == output.stat().st_size
    assert content_digest(read_weights(output).arrays) == cached_small.content_digest
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_refuses_to_overwrite_without_force(cached_small, tmp_path):
    output = tmp_path / "x.pt"
    output.write_text("keep me")
    with pytest.raises(ConflictError) as caught:
        weight_export(model=cached_small.model, fmt="pt", output=output)
    assert "already exists" in caught.value.message and caught.value.extra["kind"] == "exists"  # the CLI adds --force
    assert output.read_text() == "keep me"
    weight_export(model=cached_small.model, fmt="pt", output=output, force=True)
    assert output.read_bytes() == cached_path(cached_small).read_bytes()


def test_export_bundle_has_manifest_and_imports_back(cached_small, tmp_path):
    output = tmp_path / "small.tar"
    result = weight_export(model=cached_small.model, fmt="h5", output=output, bundle=True)

    with tarfile.open(output) as archive:
        names = archive.getnames()
        manifest = json.loads(archive.extractfile("manifest.json").read())
    assert sorted(names) == ["manifest.json", "midas_v21_small_256.h5"]
    assert manifest["model"] == "MiDaS_small" and manifest["format"] == "h5"
    assert manifest["content_digest"] == cached_small.content_digest
    # cached_small was imported from a file: the manifest names no download URL, and says where the bytes came from
    assert manifest["source_url"] == ""
    assert manifest["provenance"]["kind"] == "convert"
    assert manifest["provenance"]["converted_from"]["kind"] == "import"
    assert {"file_sha256", "created", "depthsite_version"} <= set(manifest)
    assert result.bundle

    cache_clear(model=cached_small.model)
    imported = weight_import(path=output)
    assert imported.created and imported.weight_file.format == "h5"
    assert imported.weight_file.content_digest == cached_small.content_digest


def test_bundle_with_tampered_weights_is_refused(cached_small, tmp_path):
    output = tmp_path / "small.tar"
    weight_export(model=cached_small.model, fmt="pt", output=output, bundle=True)
    with tarfile.open(output) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
    manifest["file_sha256"] = "0" * 64
    tampered = tmp_path / "tampered.tar"
    payload = json.dumps(manifest).encode()
    with tarfile.open(output) as source, tarfile.open(tampered, "w") as target:
        for member in source.getmembers():
            if member.name == "manifest.json":
                member.size = len(payload)
                import io

                target.addfile(member, io.BytesIO(payload))
            else:
                target.addfile(member, source.extractfile(member))
    cache_clear(model=cached_small.model)
    with pytest.raises(DigestMismatchError):
        weight_import(path=tampered)
    assert not WeightFile.objects.exists()


def test_interrupted_export_leaves_no_final_file(cached_small, tmp_path, monkeypatch):
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    output = out_dir / "x.h5"
    real_write = export_services.write_weights

    def write_then_die(arrays, path, fmt, metadata=None):
        real_write(arrays, path, fmt, metadata)
        raise KeyboardInterrupt("interrupted midway")

    monkeypatch.setattr(export_services, "write_weights", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        weight_export(model=cached_small.model, fmt="h5", output=output)
    assert not output.exists()
    assert list(out_dir.iterdir()) == []  # not even the temporary file


# --- optimize and clear --------------------------------------------------------------------------


def test_optimize_plans_then_removes_corrupt_orphan_missing_and_stale(cached_small, settings):
    model = cached_small.model
    h5 = weight_convert(model=model, fmt="h5")
    _damage(cached_path(h5), "truncated", None)
    weight_verify(weight_file=h5)
    pkl = weight_convert(model=model, fmt="pkl")
    cached_path(pkl).unlink()
    root = cachefs.cache_root()
    orphan = root / "MiDaS_small" / "stray.bin"
    orphan.write_bytes(b"x" * 100)
    old_partial = root / "MiDaS_small" / "midas_v21_small_256.pt.part"
    old_partial.write_bytes(b"y" * 50)
    fresh_temp = root / "MiDaS_small" / ".tmp-abc-new.pt"
    fresh_temp.write_bytes(b"z")
    # An artifact is checked in a temporary folder under its final name: a build that died leaves it there.
    staged = root / "MiDaS_small" / ".tmp-def-midas_v21_small_256.onnx" / "midas_v21_small_256.onnx"
    staged.parent.mkdir()
    staged.write_bytes(b"w" * 30)
    stale_lock = cachefs.lock_path("DPT_Large")
    stale_lock.touch()
    hours_ago = time.time() - 2 * 3600
    os.utime(old_partial, (hours_ago, hours_ago))
    os.utime(staged, (hours_ago, hours_ago))
    os.utime(stale_lock, (hours_ago, hours_ago))

    truncated_size = cached_path(h5).stat().st_size
    plan = cache_optimize_plan()

    kinds = {(item.kind, item.path) for item in plan.items}
    assert ("corrupt", h5.path) in kinds
    assert ("missing", pkl.path) in kinds
    assert ("orphan", "MiDaS_small/stray.bin") in kinds
    assert ("temporary", "MiDaS_small/midas_v21_small_256.pt.part") in kinds
    assert ("temporary", "MiDaS_small/.tmp-def-midas_v21_small_256.onnx/midas_v21_small_256.onnx") in kinds
    assert ("stale_lock", ".locks/DPT_Large.lock") in kinds
    assert not any("new.pt" in item.path for item in plan.items)  # too young to be abandoned
    assert not any(item.path == cached_small.path for item in plan.items)
    assert plan.bytes_to_free == truncated_size + 100 + 50 + 30
    assert cached_path(h5).exists()  # planning touches nothing

    done = cache_optimize_execute(plan=plan)

    assert done.freed_bytes == plan.bytes_to_free and not done.errors
    assert not cached_path(h5).exists() and not orphan.exists() and not old_partial.exists() and not staged.exists()
    assert fresh_temp.exists() and cached_path(cached_small).exists()
    assert list(WeightFile.objects.values_list("format", flat=True)) == ["pt"]


def test_optimize_evicts_least_recently_used_unpinned_files_to_fit(cached_small, write_checkpoint):
    model = cached_small.model
    h5 = weight_convert(model=model, fmt="h5")
    safetensors = weight_convert(model=model, fmt="safetensors")
    weight_mark_used(weight_file=cached_small)
    weight_mark_used(weight_file=safetensors)  # h5 is now the least recently used
    total = cached_small.size + h5.size + safetensors.size
    limit = total - 1

    plan = cache_optimize_plan(max_bytes=limit)

    assert [(item.kind, item.format) for item in plan.items] == [("evict", "h5")]
    assert plan.bytes_after <= limit

    model.pinned = True
    model.save()
    pinned_plan = cache_optimize_plan(max_bytes=limit)
    assert pinned_plan.items == [] and pinned_plan.errors  # pinned models are never evicted


def test_clear_one_format_then_the_model(cached_small):
    model = cached_small.model
    h5 = weight_convert(model=model, fmt="h5")

    result = cache_clear(model=model, fmt="h5")
    assert result.files == 1 and result.bytes == h5.size
    assert not cached_path(h5).exists() and cached_path(cached_small).exists()

    cache_clear(model=model)
    assert not WeightFile.objects.exists()
    assert not (cachefs.cache_root() / "MiDaS_small").exists()


def test_clear_everything(cached_small):
    weight_convert(model=cached_small.model, fmt="safetensors")
    result = cache_clear()
    assert result.files == 2 and result.models == ["MiDaS_small"]
    assert not WeightFile.objects.exists()


def test_cache_info_totals_and_formats(cached_small):
    weight_convert(model=cached_small.model, fmt="h5")
    info = cache_info()
    assert info["node"] == "test-node"
    assert info["totals"]["models"] == 1 and info["totals"]["files"] == 2
    assert info["formats"]["pt"]["files"] == 1 and info["formats"]["h5"]["files"] == 1
    small = next(m for m in info["models"] if m["name"] == "MiDaS_small")
    assert {f["format"] for f in small["files"]} == {"pt", "h5"}
    assert info["health"] == "good"


def test_mark_used_sets_last_used_and_writes_at_most_once_a_minute(cached_small, django_assert_num_queries):
    assert cached_small.last_used_at is None
    with django_assert_num_queries(1):
        weight_mark_used(weight_file=cached_small)
    cached_small.refresh_from_db()
    first = cached_small.last_used_at
    assert first is not None
    with django_assert_num_queries(0):  # a busy worker's next jobs: the record read says "just now"
        weight_mark_used(weight_file=cached_small)
    # A minute later, or a clock that went back: written again.
    for stamp in (first - USED_RESOLUTION, first + timedelta(hours=1)):
        WeightFile.objects.filter(pk=cached_small.pk).update(last_used_at=stamp)
        cached_small.refresh_from_db()
        with django_assert_num_queries(1):
            weight_mark_used(weight_file=cached_small)
        cached_small.refresh_from_db()
        assert first <= cached_small.last_used_at < first + timedelta(minutes=1)


@pytest.mark.slow
def test_weights_verify_covers_every_file(cached_small):
    weight_convert(model=cached_small.model, fmt="pkl")
    results = weights_verify()
    assert sorted(r.weight_file.format for r in results) == ["pkl", "pt"]
    assert all(r.ok for r in results)
