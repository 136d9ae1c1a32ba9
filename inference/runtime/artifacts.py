"""Runtime artifacts in the weight cache: find the verified ONNX file built from given weights, or build one.

An artifact is a WeightFile of format `onnx` whose content_digest is the digest of the weights it was
exported from: it is served for those weights only. It is exported here (never imported from outside), packed
into one file with its weights as external data (inference.runtime.pack), checked against eager PyTorch on
reference inputs (max |diff| <= TOLERANCE of the eager output's range) in a temporary folder, and renamed into
place only once it passed. Building needs torch; finding and using one does not.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from inference.exceptions import RuntimeArtifactError
from inference.runtime.export import EXPORTER, check_shapes, export_recipe, network_export
from inference.runtime.pack import pack_write

from models_registry import cachefs
from models_registry.choices import Health, RuntimeFormat
from depthsite.exceptions import ApplicationError, WeightFileError
from models_registry.formats import file_sha256
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_file_get
from models_registry.services.records import weight_mark_corrupt
from models_registry.services.verify import artifact_bytes_problem

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = RuntimeFormat.ONNX.value
TOLERANCE = 2e-5  # of the eager output's range: what the fidelity tests hold the eager path to
# BEiT-L 512 exports and checks in minutes on two cores: a build (or a wait for another process's) that takes an
# hour hangs. Bounds both the wait on a model's build lock and a child build process (build_process.py).
BUILD_LIMIT_S = 3600


def weights_key(weight_file: WeightFile) -> str:
    """What an artifact is keyed by: the content digest of its source weights (their sha256 when unknown)."""
    return weight_file.content_digest or weight_file.sha256


def runtime_artifact_path(*, model: RegisteredModel) -> Path:
    stem = Path(model.file_name).stem if model.file_name else model.name
    return cachefs.model_dir(model.name) / f"{stem}{RuntimeFormat.extension(ARTIFACT_FORMAT)}"


def runtime_artifact_find(*, model: RegisteredModel, weight_file: WeightFile,
                          earlier_recipe: bool = False) -> WeightFile | None:
    """The checked artifact built from exactly these weights, its bytes intact; None when there is none to use.

    One built by another export recipe than this release's is none to use (the next use rebuilds it): an earlier
    one would run slower or compute otherwise, and a later one (a newer release on the node, or the release rolled
    back from) was checked against another release's code. With `earlier_recipe`, one of an earlier recipe is
    used (where its rebuild failed). A recorded artifact whose size changed, or whose sha256 changed when its inode
    changed after it was hashed, is marked corrupt (and so rebuilt and pruned). `models verify` hashes it whatever
    its times say."""
    artifact = weight_file_get(model=model, fmt=ARTIFACT_FORMAT)
    if artifact is None or artifact.health != Health.OK or artifact.content_digest != weights_key(weight_file):
        return None
    recipe = export_recipe(model.architecture)
    if artifact.export_recipe != recipe and not (earlier_recipe and artifact.export_recipe < recipe):
        logger.info("the ONNX artifact of %s was built by export recipe %d, this release's is %d: it is rebuilt",
                    model.name, artifact.export_recipe, recipe)
        return None
    try:
        path = cachefs.absolute(artifact.path)
        stat = path.stat()
    except (OSError, ApplicationError):
        artifact.set_health(Health.MISSING, "the artifact file is gone; it is rebuilt on next use")
        artifact.save(update_fields=["health", "health_reason", "verified_at"])
        return None
    reason = artifact_bytes_problem(artifact, path, stat, trust_unchanged=True)
    if reason is not None:
        weight_mark_corrupt(weight_file=artifact, reason=reason)
        return None
    return artifact


@dataclass
class ArtifactCheck:
    shapes: list[tuple[int, int]]
    worst: float  # max |onnx - eager| / range(eager), over the shapes

    def describe(self) -> str:
        shapes = ", ".join(f"{h}x{w}" for h, w in self.shapes)
        return (f"{EXPORTER}; checked against eager at {shapes}: max |diff| {self.worst:.2e} of the range "
                f"(tolerance {TOLERANCE:g})")


def artifact_compare(network, config, path: Path) -> ArtifactCheck:
    """Run eager and the artifact on the reference inputs; the worst relative difference."""
    import numpy as np
    import torch

    from inference.health import probe_input
    from inference.runtime.onnx import session_open

    # On the threads the operator gave the network (DEPTHSITE_TORCH_THREADS), as the worker that uses it will.
    try:
        session = session_open(path, settings.DEPTHSITE_TORCH_THREADS)
    except Exception as exc:  # onnxruntime's errors share no base class: a graph it cannot load is no artifact
        said = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise RuntimeArtifactError(f"ONNX Runtime cannot open the exported graph: {said}") from None
    name = session.get_inputs()[0].name
    worst = 0.0
    shapes = check_shapes(config)
    for height, width in shapes:
        batch = probe_input(height, width)
        with torch.inference_mode():
            eager = network(torch.from_numpy(batch)).float().numpy()
        try:
            fast = session.run(None, {name: batch})[0]
        except Exception as exc:  # onnxruntime's errors share no base class: this input size does not run
            raise RuntimeArtifactError(f"the ONNX artifact does not run at {height}x{width} (eager does): "
                                       f"{str(exc).splitlines()[0][:300]}") from None
        if fast.shape != eager.shape or not np.isfinite(fast).all():
            raise RuntimeArtifactError(f"the ONNX artifact's output at {height}x{width} has shape {fast.shape} "
                                       f"or non-finite values; eager gives {eager.shape}")
        spread = float(eager.max() - eager.min()) or 1.0
        worst = max(worst, float(np.abs(fast.astype(np.float64) - eager).max() / spread))
    return ArtifactCheck(shapes=shapes, worst=worst)


def runtime_artifact_build(*, model: RegisteredModel, weight_file: WeightFile,
                           tolerance: float = TOLERANCE) -> WeightFile:
    """Export, check and record the ONNX artifact of these weights (torch is needed here).

    WeightFileError (or OSError) when the file does not load; RuntimeArtifactError when no artifact can be made;
    ConflictError when another process's build of the model held its build lock for over BUILD_LIMIT_S."""
    existing = runtime_artifact_find(model=model, weight_file=weight_file)
    if existing is not None:
        return existing
    # One build of a model at a time on a node: two workers that meet the same missing artifact would each
    # export it (minutes of CPU, and the export's memory twice). The second waits, then uses the first's.
    with cachefs.locked(build_lock_name(model), timeout=BUILD_LIMIT_S) as waited:
        if waited:
            existing = runtime_artifact_find(model=model, weight_file=weight_file)
            if existing is not None:
                return existing
        return _build(model=model, weight_file=weight_file, tolerance=tolerance)


def _built_from(weight_file: WeightFile, state_dict) -> str:
    """The key the artifact is recorded under, computed from the tensors it is built from, never taken from the
    row: a file whose tensors changed while its size did not (bit rot, another fine-tune copied over it, a crash
    between an import's rename and its record) passes the quick checks before a build, and an artifact recorded
    under the row's digest would then be served for the genuine weights, even after they were repaired.
    Tensors that disagree with their record mark the file corrupt (WeightFileError). About 1 s a GB of hashing,
    against the minutes of the export."""
    from models_registry.formats.digest import content_digest

    recorded = weights_key(weight_file)
    if weight_file.content_digest:
        computed = content_digest({name: tensor.numpy() for name, tensor in state_dict.items()})
    else:  # recorded before content digests: the file's own bytes are its key
        computed = file_sha256(cachefs.absolute(weight_file.path))
    if computed != recorded:
        reason = (f"its tensors changed since they were recorded (digest {computed[:16]}..., recorded "
                  f"{recorded[:16]}...)")
        weight_mark_corrupt(weight_file=weight_file, reason=reason)
        raise WeightFileError(f"{weight_file.model.name} [{weight_file.format}]: {reason}; verify or download it again",
                              extra={"model": weight_file.model.name, "format": weight_file.format})
    return computed


def build_lock_name(model: RegisteredModel) -> str:
    return f"{model.name}.build"


def _build(*, model: RegisteredModel, weight_file: WeightFile, tolerance: float) -> WeightFile:
    from inference.nets import create_model, get_config
    from inference.runtime.eager import network_refused, state_dict_read

    config = get_config(model.architecture)
    state_dict = state_dict_read(weight_file)
    key = _built_from(weight_file, state_dict)
    try:
        network = create_model(model.architecture, state_dict=state_dict, device="cpu").eval()
    except ValueError as exc:
        raise network_refused(model, exc) from None
    dest = runtime_artifact_path(model=model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A folder of its own: a packed artifact finds its weights by its file name, so it is written and checked
    # under the name it will have, and only then renamed into place.
    work = cachefs.temp_path_for(dest)
    staged = work / dest.name
    try:
        with cachefs.disk_full_as_error(dest):
            work.mkdir()
            exported = work / f"export{RuntimeFormat.extension(ARTIFACT_FORMAT)}"
            try:
                network_export(network, config, exported)
                pack_write(exported, staged, name=dest.name)
            except OSError:
                raise
            except Exception as exc:  # the exporter raises many kinds; each means "no artifact"
                raise RuntimeArtifactError(f"exporting {model.name} to ONNX failed: {exc}",
                                           extra={"model": model.name}) from None
            exported.unlink()
            check = artifact_compare(network, config, staged)
            if check.worst > tolerance:
                raise RuntimeArtifactError(
                    f"the ONNX artifact of {model.name} differs from eager by {check.worst:.2e} of the output "
                    f"range (tolerance {tolerance:g}); eager is used", extra={"model": model.name})
            with open(staged, "rb+") as handle:
                os.fsync(handle.fileno())
            sha256 = file_sha256(staged)
            size = staged.stat().st_size
            with cachefs.locked(model.name):
                os.replace(staged, dest)
                cachefs.fsync_dir(dest.parent)
                now = timezone.now()
                artifact, _ = WeightFile.objects.update_or_create(
                    model=model, format=ARTIFACT_FORMAT, node=cachefs.node_name(), defaults={
                        "path": cachefs.relative(dest), "size": size, "sha256": sha256,
                        "content_digest": key, "dtype": "float32", "health": Health.OK,
                        "health_reason": check.describe(), "functional_hash": "", "license": model.license,
                        "verified_at": now, "created_at": now, "origin": "build",
                        "origin_source": f"{weight_file.format} copy, sha256 {weight_file.sha256}",
                        "origin_by": "", "last_used_at": None,
                        "export_recipe": export_recipe(model.architecture)})
    except OSError as exc:
        # Said apart from the weights' own OSError above: writing the artifact failed, the weights are fine.
        raise RuntimeArtifactError(f"writing the ONNX artifact of {model.name} failed: {exc}",
                                   extra={"model": model.name}) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("built the ONNX artifact of %s (%d MB): %s", model.name, size // 1_000_000, check.describe())
    return artifact
