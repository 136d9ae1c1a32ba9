"""One depth pass for jobs and `manage.py predict` alike: weights -> warm estimator, then photo -> estimator -> writers.

Nothing here imports torch: the estimator module is imported when a pass first needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from inference.images import LoadedImage
from inference.runtime.base import DepthResult, Estimator
from inference.writers import DEFAULT_FOV_DEGREES, DepthMeta, write_outputs
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.resolve import weights_use


def estimator_ready(*, model: RegisteredModel, device: str | None = None, half: bool | None = None,
                    offline: bool | None = None) -> tuple[WeightFile, Estimator]:
    """The resolved weight file and its warm estimator. A file whose network does not build is marked corrupt
    and the next one resolved: the registry's one loop (weights_use), never the estimator's."""
    from inference.estimator import estimator_get

    return weights_use(model=model, offline=offline,
                       use=lambda weight_file: estimator_get(model=model, weight_file=weight_file, device=device,
                                                             half=half))


def depth_pass(*, estimator: Estimator, image: LoadedImage, folder: Path, stem: str, formats: Iterable[str],
               colormap: str, fov_degrees: float = DEFAULT_FOV_DEGREES,
               previews: bool = False) -> tuple[DepthResult, dict[str, Path]]:
    """Run the estimator on one photo and write the requested outputs as `<folder>/<stem><suffix>`;
    returns the result and {format: written path}."""
    result = estimator.predict(image.rgb)
    meta = DepthMeta(model=result.model, weights_sha256=result.weights_sha256, semantics=result.semantics)
    written = write_outputs(depth=result.depth, image_rgb=image.rgb, folder=folder, stem=stem, formats=formats,
                            colormap=colormap, meta=meta, fov_degrees=fov_degrees, previews=previews)
    return result, written
