"""The coloured depth PNG: an RGB image against the indexed one depthsite writes (the colour map as palette).

    .venv/bin/python bench/colour_png.py [--repeats 5] [--json]

For depth maps of three photo sizes (a smooth field with a photo's detail on it, as networks give), it encodes
both PNGs in memory at Pillow's default level, alternating, and reports the median encode time, the bytes, and
whether the two decode to the same RGB pixels. Ratios are indexed / RGB, measured in this run.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((288, 384), (480, 640), (1536, 2048))


def depth_like(height: int, width: int):
    import numpy as np

    from models_registry.detweights import synthetic_image

    detail = synthetic_image(height, width).astype(np.float32).mean(axis=2)
    rows, cols = np.mgrid[0:height, 0:width]
    return (np.sin(rows / 50) * np.cos(cols / 70) * 30 + 60 + detail / 20).astype(np.float32)


def encode_rgb(depth) -> bytes:
    from PIL import Image

    from inference.colormaps import colorize

    buffer = io.BytesIO()
    Image.fromarray(colorize(depth)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_indexed(depth) -> bytes:
    from inference.writers import color_image  # what write_color_png saves

    buffer = io.BytesIO()
    color_image(depth).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(height: int, width: int, repeats: int) -> dict:
    import numpy as np
    from PIL import Image

    depth = depth_like(height, width)
    times: dict[str, list[float]] = {"rgb": [], "indexed": []}
    encoded: dict[str, bytes] = {}
    for _ in range(repeats):
        for name, encode in (("rgb", encode_rgb), ("indexed", encode_indexed)):
            started = time.perf_counter()
            encoded[name] = encode(depth)
            times[name].append(time.perf_counter() - started)
    pixels = {name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for name, data in encoded.items()}
    rgb_s, indexed_s = statistics.median(times["rgb"]), statistics.median(times["indexed"])
    return {"size": f"{width}x{height}", "rgb_ms": rgb_s * 1000, "indexed_ms": indexed_s * 1000,
            "rgb_bytes": len(encoded["rgb"]), "indexed_bytes": len(encoded["indexed"]),
            "time_x": indexed_s / rgb_s, "bytes_x": len(encoded["indexed"]) / len(encoded["rgb"]),
            "same_pixels": bool(np.array_equal(pixels["rgb"], pixels["indexed"]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(height, width, args.repeats) for height, width in SIZES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"median of {args.repeats}, alternating; x = indexed / RGB")
    print(f"{'depth map':>10} {'RGB ms':>8} {'indexed ms':>11} {'time x':>7} {'RGB bytes':>10} {'indexed bytes':>14} "
          f"{'bytes x':>8} {'same pixels':>12}")
    for row in rows:
        print(f"{row['size']:>10} {row['rgb_ms']:8.1f} {row['indexed_ms']:11.1f} {row['time_x']:6.2f}x "
              f"{row['rgb_bytes']:10d} {row['indexed_bytes']:14d} {row['bytes_x']:7.2f}x {str(row['same_pixels']):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
