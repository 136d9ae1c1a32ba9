"""The web process never imports torch: the upload page, the job pages and the API answer without it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthsite.testing import images
from depthsite.testing.cli import PROJECT_ROOT, make_site

SCRIPT = r"""
import json, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

photo = open(sys.argv[1], "rb").read()
user = get_user_model().objects.create_user("web", password="pw-web-12345")
client = Client()
client.force_login(user)
codes = {"upload_page": client.get("/").status_code}
codes["form_post"] = client.post("/", {"image": SimpleUploadedFile("p.jpg", photo), "model": "MiDaS_small",
                                       "colormap": "inferno", "outputs": ["png"]}).status_code
created = client.post("/api/predictions/", {"image": SimpleUploadedFile("p.jpg", photo), "outputs": "png,npy"})
codes["api_post"] = created.status_code
job_id = created.json()["id"]
codes["api_get"] = client.get(f"/api/predictions/{job_id}/").status_code
codes["api_list"] = client.get("/api/predictions/").status_code
codes["job_page"] = client.get(f"/jobs/{job_id}/").status_code
codes["job_status"] = client.get(f"/jobs/{job_id}/status.json").status_code
codes["history"] = client.get("/jobs/").status_code
codes["schema"] = client.get("/api/schema/").status_code
from django_q.models import OrmQ
print(json.dumps({"codes": codes, "queued_tasks": OrmQ.objects.count(),
                  "heavy": sorted(name for name in ("torch", "timm", "torchvision") if name in sys.modules)}))
"""


@pytest.mark.slow
def test_web_and_api_answer_without_importing_torch(tmp_path):
    site = make_site(tmp_path / "site")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(images.jpeg())
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(photo)], cwd=PROJECT_ROOT, env=site.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == {"upload_page": 200, "form_post": 302, "api_post": 202, "api_get": 200,
                               "api_list": 200, "job_page": 200, "job_status": 200, "history": 200, "schema": 200}
    assert report["queued_tasks"] == 2  # real settings: the jobs went to the ORM broker, not run inline
    assert report["heavy"] == []
