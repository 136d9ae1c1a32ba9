"""The warm pool evicts by bytes as well as by count (DEPTHSITE_WARM_BYTES), making room before it builds,
and `models info` / the dashboard show what each worker holds warm and its size."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from inference import estimator as estimator_module
from tests.support.estimators import pool_warm
from inference.worker import worker_id
from inference.estimator import EstimatorPool, network_bytes
from models_registry.catalogue import approx_bytes
from models_registry.models import RegisteredModel, WarmModel
from models_registry.services.imports import weight_import
from models_registry.detweights import synthetic_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def three_smalls(cached_small, small_pt):
    """MiDaS_small plus two custom entries on its architecture, each with its weights cached."""
    for name in ("small_a", "small_b"):
        RegisteredModel.objects.create(name=name, display_name=name, architecture="MiDaS_small", file_name=f"{name}.pt")
        weight_import(path=small_pt, model_name=name)
    return ["MiDaS_small", "small_a", "small_b"]


def test_network_bytes_are_its_tensors(cached_small):
    pool = EstimatorPool(capacity=1)
    try:
        estimator = pool_warm(pool, "MiDaS_small")
        expected = sum(t.numel() * t.element_size() for t in estimator.network.state_dict().values())
        assert estimator.bytes == network_bytes(estimator.network) == expected
        # The catalogue's torch-free estimate, used to make room before a build, is the same figure.
        assert abs(estimator.bytes - approx_bytes("MiDaS_small")) <= 0.01 * estimator.bytes
        warm = WarmModel.objects.get()
        assert warm.bytes == estimator.bytes and pool.bytes == estimator.bytes
        assert pool.warm()[0]["bytes"] == estimator.bytes
    finally:
        pool.clear()


def test_pool_evicts_by_bytes_before_building(three_smalls, monkeypatch):
    one = approx_bytes("MiDaS_small")
    pool = EstimatorPool(capacity=10, max_bytes=int(2.5 * one))  # room for two by bytes, ten by count
    held_at_build = []
    real_build = estimator_module.estimator_build

    def spying_build(**kwargs):
        held_at_build.append(sorted(entry["model"] for entry in pool.warm()))
        return real_build(**kwargs)

    monkeypatch.setattr(estimator_module, "estimator_build", spying_build)
    try:
        a = pool_warm(pool, "small_a")
        pool_warm(pool, "small_b")
        assert pool_warm(pool, "small_a") is a  # small_a is now the most recent
        pool_warm(pool, "MiDaS_small")
        # small_b (least recently used) went BEFORE MiDaS_small was built: never three in memory at once.
        assert held_at_build[-1] == ["small_a"]
        assert sorted(entry["model"] for entry in pool.warm()) == ["MiDaS_small", "small_a"]
        assert sorted(WarmModel.objects.values_list("model__name", flat=True)) == ["MiDaS_small", "small_a"]
        assert pool.bytes <= int(2.5 * one)
    finally:
        pool.clear()


def test_a_network_larger_than_the_budget_still_runs_alone(three_smalls, settings):
    settings.DEPTHSITE_WARM_BYTES = 1000  # smaller than any network
    pool = EstimatorPool(capacity=10)
    try:
        pool_warm(pool, "small_a")
        estimator = pool_warm(pool, "small_b")
        assert [entry["model"] for entry in pool.warm()] == ["small_b"]
        assert estimator.predict(synthetic_image(64, 64)).depth.shape == (64, 64)
    finally:
        pool.clear()


def test_models_info_and_dashboard_show_warm_networks_per_worker(cached_small, client, django_user_model):
    # Worker names are operators' facts: anonymous readers get them redacted, signed-in staff see them.
    client.force_login(django_user_model.objects.create_user("op", password="x", is_staff=True))
    pool = EstimatorPool(capacity=2)
    try:
        estimator = pool_warm(pool, "MiDaS_small")
        out = io.StringIO()
        call_command("models", "info", "--json", stdout=out)
        warm = json.loads(out.getvalue())["warm"]
        assert [(w["worker"], w["bytes"], [m["model"] for m in w["models"]]) for w in warm] == [
            (worker_id(), estimator.bytes, ["MiDaS_small"])]
        out = io.StringIO()
        call_command("models", "info", stdout=out)
        text = out.getvalue()
        assert "Warm networks" in text and worker_id() in text and "MiDaS_small on cpu" in text
        page = client.get("/models/").content.decode()
        assert "Warm networks per worker" in page and worker_id() in page
        status = client.get("/api/models/status").json()
        small = next(row for row in status["models"] if row["name"] == "MiDaS_small")
        assert small["warm"][0]["bytes"] == estimator.bytes
    finally:
        pool.clear()
