"""Whole `manage.py predict` processes with and without DEPTHSITE_FP16, alternating, on N copies of one photo.

    .venv/bin/python bench/load.py --models DPT_Large --runs 1      # once: the site, the weights, the artifact
    .venv/bin/python bench/half.py [--model DPT_Large] [--images 16] [--rounds 2]

It runs in bench/load.py's site (var/bench/site, its photo and its imported weights). Each round runs one
process with DEPTHSITE_FP16=0 and one with =1, result reuse off, and prints both whole-process times, their ratio,
and the decision line the estimator pool logs (on a CPU with AMX: bfloat16 against float32, each timed; elsewhere:
ignored). With fewer than 8 images a process runs float32 without timing (inference.estimator.HALF_FROM_RUNS).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import load  # noqa: E402  (bench/load.py: the site's environment and files)


def run(env: dict[str, str], model: str, photos: list[Path], out: Path) -> tuple[float, list[str]]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), "predict", *map(str, photos), "--model", model,
                             "--output", str(out), "--format", "png", "--offline"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"predict failed: {result.stderr.strip().splitlines()[-1:]}")
    said = [line.split(": ", 1)[-1] for line in (result.stdout + result.stderr).splitlines() if "DEPTHSITE_FP16" in line]
    return seconds, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DPT_Large")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    photo = load.BENCH_DIR / "photo.jpg"
    if not photo.exists():
        raise SystemExit(f"no {photo}: run bench/load.py --models {args.model} --runs 1 first")
    from inference.runtime.cpu import bf16_units, cpu_name

    print(f"{cpu_name()}; bfloat16 units: {bf16_units() or 'none'}; {args.model}, {args.images} photos a process")
    base = load.site_env()
    base.update(DEPTHSITE_REUSE_RESULTS="0", DEPTHSITE_LOG_LEVEL="INFO")
    with tempfile.TemporaryDirectory() as folder:
        photos = []
        for index in range(args.images):
            photos.append(Path(folder) / f"photo-{index}.jpg")
            shutil.copy(photo, photos[-1])
        for round_ in range(args.rounds):
            times = {}
            for fp16 in ("0", "1"):
                times[fp16], said = run(dict(base, DEPTHSITE_FP16=fp16), args.model, photos, Path(folder) / "out")
                print(f"round {round_ + 1}  DEPTHSITE_FP16={fp16}  {times[fp16]:6.2f} s  {' | '.join(said)}", flush=True)
            print(f"round {round_ + 1}  FP16 / fp32 whole process: {times['1'] / times['0']:.2f}x")


if __name__ == "__main__":
    main()
