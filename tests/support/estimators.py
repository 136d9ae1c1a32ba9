"""Warm an estimator pool of the tests' own by model name, resolving the weights as jobs and `predict` do."""
from __future__ import annotations

from inference.estimator import EstimatorPool
from inference.runtime.base import Estimator
from models_registry.selectors import model_get
from models_registry.services.resolve import weights_use


def pool_warm(pool: EstimatorPool, name: str, **options) -> Estimator:
    """pool.get for the file the registry resolves (a file whose network does not build is marked corrupt and
    the next one tried)."""
    model = model_get(name=name, enabled_only=True)
    return weights_use(model=model, use=lambda weight_file: pool.get(model=model, weight_file=weight_file,
                                                                       **options))[1]
