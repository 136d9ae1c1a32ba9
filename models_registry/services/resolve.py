"""The resolution chain: which file a model is loaded from on this node.

A healthy cached file in the preferred format (DEPTHSITE_CACHE_FORMAT), else any healthy format (converted
when a format is preferred), else a download unless offline, else a clear error. A file that turns out not
to load is marked corrupt and the chain goes on with the next one.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

from depthsite.exceptions import ApplicationError
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.download import Notify, healthy_files, wanted_format, weight_download
from models_registry.services.licences import model_license_check
from models_registry.services.export import weight_convert
from models_registry.services.records import weights_first_usable

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


def weights_use(*, model: RegisteredModel, use: Callable[[WeightFile], T], offline: bool | None = None,
                notify: Notify | None = None) -> tuple[WeightFile, T]:
    """`use` applied to the resolved file; a file that fails there is marked corrupt and the chain resolves the
    next one (weights_first_usable)."""
    return weights_first_usable(model=model, use=use, rounds=RESOLVE_ROUNDS,
                                pick=lambda: weights_resolve(model=model, offline=offline, notify=notify))
