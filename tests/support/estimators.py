"""Warm an estimator pool of the tests' own by model name, resolving the weights as jobs and `predict` do; and an
estimator's bookkeeping without a network (RowStub), for tests of the pool and its warm rows."""
from __future__ import annotations

from inference.estimator import EstimatorPool
from inference.runtime.base import Estimator
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_get
from models_registry.services.resolve import weights_use


def pool_warm(pool: EstimatorPool, name: str, **options) -> Estimator:
    """pool.get for the file the registry resolves (a file whose network does not build is marked corrupt and
    the next one tried)."""
    model = model_get(name=name, enabled_only=True)
    return weights_use(model=model, use=lambda weight_file: pool.get(model=model, weight_file=weight_file,
                                                                       **options))[1]


class RowStub:
    """An eager estimator's bookkeeping without a network: what the pool and its warm rows read of one."""

    runtime = "eager"
    device_name = "cpu"
    dtype_name = "float32"

    def __init__(self, *, model: RegisteredModel, weight_file: WeightFile, **_options):
        self.model_name = model.name
        self.weights_sha256 = weight_file.sha256
        self.weights_format = weight_file.format
        self.weight_file_id = weight_file.pk
        self.bytes = 1_000_000 * weight_file.pk
        self.load_ms = 10.0 * weight_file.pk
        self.released = False

    @property
    def key(self) -> tuple:
        return (self.model_name, self.weights_sha256, "cpu", "torch.float32", "eager")

    def release(self) -> None:
        self.released = True
