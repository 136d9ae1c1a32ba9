"""With DEPTHSITE_PUBLIC_STATUS on, anonymous readers see what a user needs and nothing of operators or files:
no user names, node or worker names, cache paths, mirror URLs, or free-text errors that can quote file bytes."""
from __future__ import annotations

import pytest

from depthsite.choices import RunStatus
from models_registry.choices import Health
from models_registry.models import WarmModel, WeightDownload, WeightFile

pytestmark = pytest.mark.django_db
NODE = "secret-node-7"
OPERATOR = "opsadmin-jane"
WORKER = "gpu-host-secret:4242"
MIRROR = "file:///srv/secret-mirror/midas_v21_small_256.pt"
FILE_BYTES = "root:x:0:0:root"
PATH = "MiDaS_small/midas_v21_small_256.h5"


@pytest.fixture
def operators_traces(settings, small_model):
    """Registry rows full of what only operators may read."""
    settings.DEPTHSITE_NODE = NODE
    small_model.sha256_pinned_from = OPERATOR
    small_model.expected_sha256 = "ab" * 32
    small_model.save()
    WeightFile.objects.create(model=small_model, format="h5", path=PATH, size=40_000_000, sha256="2" * 64,
                              node=NODE, health=Health.CORRUPT,
                              health_reason=f"{MIRROR} is not weights: it starts with b'{FILE_BYTES}'")
    download = WeightDownload.objects.create(model=small_model, node=NODE, status=RunStatus.FAILED,
                                             requested_by=OPERATOR, source_url=MIRROR,
                                             error=f"{MIRROR} is an HTML page, not weights: b'{FILE_BYTES}'")
    WarmModel.objects.create(model=small_model, worker=WORKER, node=NODE, device="cpu", dtype="float32")
    return download


def pages(download) -> list[str]:
    return ["/api/models/", "/api/models/MiDaS_small/", "/api/models/status", "/api/models/cache/info",
            f"/api/models/downloads/{download.pk}", "/models/", "/models/chart.svg"]


def secrets(settings) -> list[str]:
    cache_dir = str(settings.DEPTHSITE_CACHE_DIR)
    return [NODE, OPERATOR, WORKER, MIRROR, "/srv/secret-mirror", FILE_BYTES, PATH, cache_dir, "gpu-host-secret"]


def test_anonymous_readers_see_no_operator_machine_or_file_details(client, settings, operators_traces):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    for page in pages(operators_traces):
        response = client.get(page)
        assert response.status_code == 200, page
        body = response.content.decode()
        for secret in secrets(settings):
            assert secret not in body, f"{page} shows {secret!r} to an anonymous reader"
    # What a user needs is still there.
    status = client.get("/api/models/status").json()
    small = next(model for model in status["models"] if model["name"] == "MiDaS_small")
    assert small["health"] == "corrupt" and small["formats"][0]["format"] == "h5"
    assert small["formats"][0]["health_reason"] == "this file failed its checks; an operator can see why"
    assert small["download"]["status"] == "failed" and small["download"]["error"].startswith("the download failed")
    assert small["warm"][0]["device"] == "cpu" and small["expected_sha256"] == "ab" * 32
    html = client.get("/models/").content.decode()
    assert 'data-model="MiDaS_small"' in html and "corrupt" in html


@pytest.mark.parametrize("who", ["user", "staff"])
def test_signed_in_readers_still_see_everything(clients, settings, operators_traces, who):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    status = clients[who].get("/api/models/status").content.decode()
    info = clients[who].get("/api/models/cache/info").content.decode()
    catalogue = clients[who].get("/api/models/").content.decode()
    for secret in (NODE, OPERATOR, WORKER, MIRROR, FILE_BYTES, PATH):
        assert secret in status + catalogue
    assert str(settings.DEPTHSITE_CACHE_DIR) in info
