"""`manage.py predict IMAGE ... --model M --output DIR`: depth maps for local photos with a warm estimator."""
from __future__ import annotations

import sys
from pathlib import Path

from django.conf import settings

from inference.colormaps import COLORMAPS, DEFAULT_COLORMAP
from inference.writers import DEFAULT_FOV_DEGREES, OUTPUT_FORMATS, fov_check, parse_formats
from models_registry.catalogue import DEFAULT_MODEL
from depthsite.exceptions import ApplicationError
from depthsite.commands import CliError, RegistryCommand


class Command(RegistryCommand):
    help = "Estimate depth for image files and write the outputs into a folder."

    def add_arguments(self, parser):
        parser.add_argument("images", nargs="+", metavar="IMAGE")
        parser.add_argument("--model", default=DEFAULT_MODEL)
        parser.add_argument("--output", required=True, metavar="DIR")
        parser.add_argument("--format", default="png", dest="formats",
                            help=f"one of {', '.join(OUTPUT_FORMATS)}, a comma list, or all")
        parser.add_argument("--colormap", default=DEFAULT_COLORMAP, choices=COLORMAPS)
        parser.add_argument("--fov", type=float, default=DEFAULT_FOV_DEGREES, metavar="DEGREES",
                            help="horizontal field of view of the pinhole camera the .ply point cloud assumes "
                                 f"(default {DEFAULT_FOV_DEGREES:g})")
        parser.add_argument("--device", help="cpu, cuda, cuda:N (default: DEPTHSITE_DEVICE, else CUDA if present)")
        parser.add_argument("--offline", action="store_true", help="never download missing weights")

    def handle(self, *args, images, model, output, formats, colormap, device=None, offline=False,
               fov=DEFAULT_FOV_DEGREES, **options):
        from tqdm import tqdm

        from inference.estimator import estimator_pool
        from inference.images import image_open
        from inference.pipeline import depth_pass, estimator_ready
        from models_registry.selectors import model_get

        formats = parse_formats(formats)
        fov = fov_check(fov)
        folder = Path(output).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        estimator_pool().expect_runs(len(images))  # a process that runs a few images opens its model faster
        _, estimator = estimator_ready(model=model_get(name=model, enabled_only=True), device=device,
                                       offline=offline or None)
        failures = 0
        stems: set[str] = set()
        show = len(images) > 1 and sys.stderr.isatty()
        for name in tqdm(images, desc=f"depth ({estimator.model_name})", unit="image", disable=not show):
            path = Path(name)
            stem = path.stem
            if stem in stems:  # two inputs with one stem would overwrite each other's outputs
                stem = f"{stem}-{len(stems)}"
            try:
                loaded = image_open(path, max_pixels=settings.DEPTHSITE_MAX_IMAGE_PIXELS)
                result, written = depth_pass(estimator=estimator, image=loaded, folder=folder, stem=stem,
                                             formats=formats, colormap=colormap, fov_degrees=fov)
            except ApplicationError as exc:
                failures += 1
                self.stderr.write(f"error: {name}: {exc.message}")
                continue
            stems.add(stem)
            if not show:
                self.stdout.write(f"{name}: {loaded.width}x{loaded.height}, depth {result.depth_min:.4g}..{result.depth_max:.4g} "
                                  f"in {result.inference_ms:.0f} ms -> {', '.join(p.name for p in written.values())}")
        if failures:
            raise CliError(f"{failures} of {len(images)} image(s) failed", returncode=1)
