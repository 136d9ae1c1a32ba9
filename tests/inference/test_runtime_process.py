"""A real process on the ONNX path: `models optimize --build-runtime` builds the artifact, and then
`predict` and a depth job run without importing torch, timm or torchvision."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from depthsite.testing.cli import make_site
from models_registry.detweights import synthetic_image

pytestmark = pytest.mark.slow

HEAVY = ("torch", "timm", "torchvision")

# Runs inside the site's process: a predict, then a depth job run inline, then the heavy modules it imported.
PROBE = textwrap.dedent("""
    import json, sys
    import django
    django.setup()
    from django.core.management import call_command
    call_command("predict", sys.argv[1], "--model", "MiDaS_small", "--output", sys.argv[2], "--format", "npy")
    from django.core.files import File
    from inference.services.job_runs import depth_job_run
    from inference.services.jobs import depth_job_create
    with open(sys.argv[1], "rb") as handle:
        job = depth_job_create(image=File(handle, name="photo.png"), model="MiDaS_small", outputs="npy")
    depth_job_run(job=job)
    job.refresh_from_db()
    print(json.dumps({"heavy": sorted(m for m in %r if m in sys.modules), "job": job.status}))
""" % (HEAVY,))


def small_site(root):
    """A site on the default runtime with MiDaS_small's weights imported and no artifact built yet."""
    site = make_site(root / "site", DEPTHSITE_RUNTIME="auto")
    arrays_path = root / "midas_v21_small_256.pt"
    from models_registry.formats import write_weights
    from models_registry.detweights import det_numpy_state_dict

    write_weights(det_numpy_state_dict("MiDaS_small"), arrays_path, "pt", {})
    imported = site.manage("models", "import", str(arrays_path), "--model", "MiDaS_small")
    assert imported.returncode == 0, imported.stderr
    return site


def run_probe(site, photo, out, **env):
    import subprocess
    import sys

    from depthsite.testing.cli import PROJECT_ROOT

    probe = subprocess.run([sys.executable, "-c", PROBE, str(photo), str(out)], cwd=PROJECT_ROOT,
                           env=site.env(**env), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    return small_site(tmp_path_factory.mktemp("runtime-site"))


def test_build_runtime_then_predict_and_a_job_without_torch(site, tmp_path):
    built = site.manage("models", "optimize", "--build-runtime", "--json")
    assert built.returncode == 0, built.stderr
    runtime = json.loads(built.stdout)["runtime"]
    assert [(entry["model"], entry["ok"], entry["format"]) for entry in runtime] == [("MiDaS_small", True, "onnx")]
    assert "checked against eager" in runtime[0]["detail"] and runtime[0]["size"] > 1_000_000
    info = json.loads(site.manage("models", "info", "--json").stdout)
    files = {f["format"]: f for m in info["models"] for f in m["files"] if m["name"] == "MiDaS_small"}
    assert files["onnx"]["health"] == "ok" and files["onnx"]["sha256"] == runtime[0]["sha256"]

    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(240, 320)).save(photo)
    out = tmp_path / "out"
    assert run_probe(site, photo, out) == {"heavy": [], "job": "succeeded"}
    depth = np.load(out / "photo.npy")
    assert depth.shape == (240, 320) and np.isfinite(depth).all()


def test_an_artifact_built_on_first_use_is_built_in_a_child_process(tmp_path):
    site = small_site(tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(96, 128)).save(photo)
    # No artifact yet: the probe's predict builds it, in a child process, so the probe never imports torch.
    assert run_probe(site, photo, tmp_path / "out") == {"heavy": [], "job": "succeeded"}
    info = json.loads(site.manage("models", "info", "--json").stdout)
    files = {f["format"]: f for m in info["models"] for f in m["files"] if m["name"] == "MiDaS_small"}
    assert files["onnx"]["health"] == "ok" and "checked against eager" in files["onnx"]["health_reason"]


def test_eager_setting_imports_torch_as_before(site, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(96, 128)).save(photo)
    script = ("import sys, django; django.setup(); from django.core.management import call_command; "
              "call_command('predict', sys.argv[1], '--model', 'MiDaS_small', '--output', sys.argv[2], "
              "'--format', 'npy'); print('torch' in sys.modules)")
    import subprocess
    import sys

    from depthsite.testing.cli import PROJECT_ROOT

    probe = subprocess.run([sys.executable, "-c", script, str(photo), str(tmp_path / "out")], cwd=PROJECT_ROOT,
                           env=site.env(DEPTHSITE_RUNTIME="eager"), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "True"  # the probe above can tell the difference
