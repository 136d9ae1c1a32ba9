"""Runtime artifacts from the registry's side: which models get one, and the builder the inference app registers.

The registry never imports inference: the inference app registers the function that exports and checks
an artifact (`runtime_builder_register`), as it registers the functional health check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from models_registry.choices import Health
from depthsite.exceptions import ApplicationError, InvalidRequestError
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_list, weight_files_usable

logger = logging.getLogger(__name__)

# builder(model=...) -> the recorded, checked artifact (a WeightFile of a runtime format).
RuntimeBuilder = Callable[..., WeightFile]
_builders: list[RuntimeBuilder] = []


def runtime_builder_register(builder: RuntimeBuilder) -> None:
    if builder not in _builders:
        _builders.append(builder)


@dataclass
class RuntimeBuild:
    model: str
    ok: bool
    detail: str
    artifact: WeightFile | None = None

    def as_dict(self) -> dict[str, Any]:
        artifact = self.artifact
        return {"model": self.model, "ok": self.ok, "detail": self.detail,
                "format": artifact.format if artifact else None, "size": artifact.size if artifact else None,
                "sha256": artifact.sha256 if artifact else None,
                "weights_digest": artifact.content_digest if artifact else None}


def runtime_artifacts_build(*, model: RegisteredModel | None = None) -> list[RuntimeBuild]:
    """Build (or find current) the runtime artifact of every model with usable cached weights on this node."""
    if not _builders:
        raise InvalidRequestError("no runtime builder is registered (the inference app is not installed)")
    chosen = [model] if model is not None else [m for m in model_list(enabled_only=True)
                                                 if weight_files_usable(model=m)]
    if model is not None and not weight_files_usable(model=model):
        raise InvalidRequestError(f"{model.name} has no usable cached weights on this node to build from",
                              extra={"model": model.name})
    results = []
    for entry in chosen:
        try:
            artifact = _builders[-1](model=entry, offline=True)
        except ApplicationError as exc:
            results.append(RuntimeBuild(model=entry.name, ok=False, detail=exc.message))
            continue
        ok = artifact.health == Health.OK
        results.append(RuntimeBuild(model=entry.name, ok=ok, detail=artifact.health_reason, artifact=artifact))
    return results
