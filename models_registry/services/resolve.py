"""The resolution chain: which file a model is loaded from on this node.

A healthy cached file in the preferred format (DEPTHSITE_CACHE_FORMAT), else any healthy format (converted
when a format is preferred), else a download unless offline, else a clear error. A file that turns out not
to load is marked corrupt and the chain goes on with the next one.
"""
from __future__ import annotations

import logging

from models_registry import cachefs
from depthsite.exceptions import ApplicationError, WeightFileError
from models_registry.formats import LoadedWeights, read_weights
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.download import Notify, healthy_files, wanted_format, weight_download
from models_registry.services.licences import model_license_check
from models_registry.services.weights import weight_convert, weight_mark_corrupt

logger = logging.getLogger(__name__)

RESOLVE_ROUNDS = 4  # one per format, plus a fresh download


def weights_resolve(*, model: RegisteredModel, offline: bool | None = None, notify: Notify | None = None) -> WeightFile:
    """The file to load the model from: a healthy cached file in the preferred format, else any healthy
    format (converted when DEPTHSITE_CACHE_FORMAT asks), else a download unless offline, else a clear error."""
    model_license_check(model=model)
    preferred = wanted_format(None)
    for _ in range(RESOLVE_ROUNDS):
        files = healthy_files(model)
        if not files:
            break
        exact = [f for f in files if f.format == preferred]
        if exact or not preferred:
            return (exact or files)[0]
        try:
            return weight_convert(model=model, fmt=preferred)
        except ApplicationError as exc:
            # A conversion that fails (disk full, all sources damaged) must not stop loading what exists.
            logger.warning("could not convert %s to %s: %s", model.name, preferred, exc.message)
            files = healthy_files(model)
            if files:
                return files[0]
    return weight_download(model=model, fmt=preferred, offline=offline, notify=notify).weight_file


def weights_resolve_loaded(*, model: RegisteredModel, offline: bool | None = None,
                           notify: Notify | None = None) -> tuple[WeightFile, LoadedWeights]:
    """`weights_resolve`, then read the tensors; a file that fails to load is marked corrupt and the chain goes on."""
    last_error = ""
    for _ in range(RESOLVE_ROUNDS):
        weight_file = weights_resolve(model=model, offline=offline, notify=notify)
        try:
            return weight_file, read_weights(cachefs.absolute(weight_file.path), weight_file.format,
                                              architecture=model.architecture)
        except (WeightFileError, OSError) as exc:
            last_error = getattr(exc, "message", None) or str(exc)
            weight_mark_corrupt(weight_file=weight_file, reason=last_error)
    raise WeightFileError(f"no cached file of {model.name} loads (last error: {last_error}); "
                          f"run python manage.py models verify --model {model.name}",
                          extra={"model": model.name})
