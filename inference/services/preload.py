"""Warm the models named by DEPTHSITE_PRELOAD in a worker before it takes its first job.

The first user after a deploy would otherwise pay the load (seconds for the large models). A model that
cannot be warmed (unknown, disabled, not cached while offline, refused licence) is logged and skipped: the
worker still serves, and the job that asks for it later gets the real error.
"""
from __future__ import annotations

import logging
import time

from django.conf import settings

from depthsite.exceptions import ApplicationError

logger = logging.getLogger(__name__)


def models_preload(*, names: list[str] | None = None) -> dict[str, str]:
    """{model: "warm" | the reason it is not} for each name (DEPTHSITE_PRELOAD when not given)."""
    from inference.pipeline import estimator_ready
    from models_registry.selectors import model_get

    outcome: dict[str, str] = {}
    for name in names if names is not None else settings.DEPTHSITE_PRELOAD:
        started = time.perf_counter()
        try:
            estimator_ready(model=model_get(name=name, enabled_only=True))
        except ApplicationError as exc:
            outcome[name] = exc.message
            logger.warning("DEPTHSITE_PRELOAD: %s not warmed: %s", name, exc.message)
            continue
        outcome[name] = "warm"
        logger.info("DEPTHSITE_PRELOAD: %s warm in %.1f s", name, time.perf_counter() - started)
    return outcome
