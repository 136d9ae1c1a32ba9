#!/usr/bin/env python3
"""Screenshots of the real pages for the README, taken with headless Chromium from a throwaway depthsite.

The script builds an isolated site in a temporary folder (SQLite, cache, media), imports generated MiDaS_small
weights (the deterministic official-layout checkpoint the tests use: real weights cannot be downloaded here),
starts `runserver` and a `qcluster` worker on loopback, uploads a drawn photo through the upload form as a user
would, and photographs the job page (with its 3D view), the upload form, the model dashboard and the admin.

    .venv/bin/python scripts/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium] [--keep]

Needs Debian's Chromium (`apt-get install chromium`) and Playwright (requirements-dev.txt); it never downloads a
browser. The generated weights are not trained, so the depth pictured shows the pipeline, not MiDaS's quality.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIEWPORT = {"width": 1280, "height": 860}
ADMIN_USER, ADMIN_PASSWORD = "admin", "screenshots-only-password"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def site_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "depthsite.settings",
        "DJANGO_DEBUG": "1",  # runserver serves the static files
        "DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "DEPTHSITE_VAR_DIR": str(root / "var"),
        "DEPTHSITE_CACHE_DIR": str(root / "cache"),
        "DEPTHSITE_MEDIA_ROOT": str(root / "media"),
        "DEPTHSITE_NODE": "screenshots",
        "DEPTHSITE_OFFLINE": "1",
        "DEPTHSITE_PUBLIC_UPLOADS": "1",
        "DEPTHSITE_PUBLIC_STATUS": "1",
        "DEPTHSITE_QUEUE_NAME": f"screenshots-{os.getpid()}",
        "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
        "OMP_NUM_THREADS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def manage(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def generated_weights(folder: Path) -> Path:
    """MiDaS_small's official key layout filled by the tests' deterministic rule, as the release file is named."""
    from models_registry.detweights import det_numpy_state_dict

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
    import django

    django.setup()
    from models_registry.formats import write_weights

    path = folder / "midas_v21_small_256.pt"
    write_weights(det_numpy_state_dict("MiDaS_small"), path, "pt", {})
    return path


def drawn_photo(path: Path, width: int = 640, height: int = 420) -> Path:
    """A small drawn scene (sky, ground, a ball, a box): something recognisable to upload."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0, 1, height)[:, None]
    sky = np.stack([120 + 80 * y, 170 + 60 * y, 235 + 0 * y], axis=-1).repeat(width, axis=1)
    image = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.55)
    for row in range(horizon, height):
        shade = int(90 + 110 * (row - horizon) / (height - horizon))
        draw.line([(0, row), (width, row)], fill=(shade // 2 + 30, shade, shade // 3 + 20))
    draw.polygon([(380, 170), (540, 170), (560, 330), (360, 330)], fill=(170, 120, 80), outline=(90, 60, 40))
    draw.ellipse([120, 200, 300, 380], fill=(210, 60, 50), outline=(120, 30, 25))
    draw.ellipse([165, 235, 215, 270], fill=(245, 150, 140))
    image.save(path, quality=92)
    return path


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer at {url}")
            time.sleep(0.3)


def save_small(png: bytes, dest: Path, *, width: int = 1000) -> None:
    """Scaled to `width` and reduced to a 256-colour palette: README images stay around 100 KB."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            dest, optimize=True)
    print(f"wrote {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} ({dest.stat().st_size // 1024} KB)")


def take(base: str, out: Path, chromium: str, photo: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            page.set_default_timeout(60_000)

            # The upload form, filled in as a person would, then the job page once the worker is done.
            page.goto(base + "/")
            page.set_input_files("#id_image", str(photo))
            page.check('input[name=model][value="MiDaS_small"]')
            for output in ("png", "png16", "ply"):
                page.check(f'input[name=outputs][value="{output}"]')
            page.select_option("select[name=colormap]", "inferno")
            save_small(page.screenshot(full_page=False), out / "upload.png")
            page.click("#submit-upload")
            page.wait_for_url("**/jobs/*/")
            page.wait_for_selector('#job-status:text("succeeded")', timeout=300_000)
            page.wait_for_selector('#viewer3d[data-state="ready"]', timeout=60_000)
            page.wait_for_timeout(800)
            page.locator("#compare-slider").fill("55")
            page.evaluate("() => window.scrollTo(0, 0)")
            save_small(page.screenshot(full_page=True), out / "job.png")
            canvas = page.locator("#viewer3d-canvas")
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 160, box["y"] + box["height"] / 2 + 30, steps=10)
            page.mouse.up()
            page.wait_for_timeout(600)
            save_small(canvas.screenshot(), out / "job-3d.png", width=800)

            page.goto(base + "/models/")
            page.wait_for_selector('tr[data-model="MiDaS_small"]')
            save_small(page.screenshot(full_page=False), out / "dashboard.png")

            page.goto(base + "/admin/login/?next=/admin/models_registry/weightfile/")
            page.fill("#id_username", ADMIN_USER)
            page.fill("#id_password", ADMIN_PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/models_registry/weightfile/")
            page.set_viewport_size({"width": 1366, "height": 768})
            save_small(page.screenshot(full_page=False), out / "admin.png")
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNGs (docs/img)")
    parser.add_argument("--chromium", default=os.environ.get("DEPTHSITE_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary site (printed) for a look")
    args = parser.parse_args()
    if not os.access(args.chromium, os.X_OK):
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install chromium (never a downloaded browser)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    root = Path(tempfile.mkdtemp(prefix="depthsite-screenshots-"))
    env = site_env(root)
    processes: list[subprocess.Popen] = []
    try:
        manage(env, "migrate", "--noinput", "-v0")
        manage(env, "models", "import", str(generated_weights(root)), "--model", "MiDaS_small")
        manage(env, "createsuperuser", "--noinput", "--username", ADMIN_USER, "--email", "admin@example.com")
        port = free_port()
        log = open(root / "server.log", "w")
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "qcluster"], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        processes.append(subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/favicon.ico")
        take(base, out, args.chromium, drawn_photo(root / "garden.jpg"))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if args.keep:
            print(f"site kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
