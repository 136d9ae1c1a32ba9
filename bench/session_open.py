"""Opening an ONNX artifact: the plain file against the packed one depthsite builds, with and without repacking.

    .venv/bin/python bench/session_open.py [--models DPT_Large,MiDaS_small] [--runs 3] [--forwards 3] [--openvino]
        [--json]

For each model it exports the network once with deterministic weights (cached under var/bench/session_open/),
writes the plain ONNX file (the weights inside the graph, as artifacts were before 2026-12-07) and the packed
artifact (inference.runtime.pack: the weights as external data in the same file), then alternates fresh
processes that import only numpy and onnxruntime and measure, at the model's native input:

  plain      session open, first and steady forward of the plain file, repacked at open (ORT's default)
  packed     the same for the packed file: what a worker opens
  packed-np  the packed file without repacking: what `manage.py predict` opens for a few images
  openvino   with --openvino (the package installed): OpenVINO's CPU plugin compiling the packed file's graph in
             float32 (a candidate runtime, not one depthsite uses; docs/performance.md)

and the process's peak RSS over its floor (after the imports, before the open), against the weights' bytes.
Medians over --runs; ratios are against `plain` in the same run. `crossover` is how many images one process
must run before repacking pays for its open time: 1 + (open + first forward saved) / (steady time lost),
which is what inference.estimator.PREPACK_FROM_RUNS is set from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKDIR = ROOT / "var" / "bench" / "session_open"
KINDS = ("plain", "packed", "packed-np")


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that over exec, so a
    child started by a parent holding the export would report the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def openvino_open(path: str, threads: int):
    """OpenVINO's compiled model of a packed artifact, and a function running it. Its ONNX reader takes a file: the
    graph is written beside the artifact for the read (its weights are found there by name), then removed."""
    import tempfile

    import openvino

    from inference.runtime.pack import pack_read

    packed = pack_read(path)
    core = openvino.Core()
    handle, graph = tempfile.mkstemp(suffix=".onnx", dir=packed.folder)
    try:
        os.write(handle, packed.graph)
        os.close(handle)
        model = core.read_model(graph)
    finally:
        os.unlink(graph)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)})
    del model
    request = compiled.create_infer_request()
    return compiled, lambda batch: request.infer({0: batch})[0]


def child(kind: str, path: str, height: int, width: int, forwards: int) -> dict:
    import numpy as np

    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if kind == "openvino":
        import openvino  # noqa: F401  (imported before the floor is read)
    else:
        import onnxruntime  # noqa: F401

        from inference.runtime.onnx import session_open
    floor = status_mb("VmRSS")
    started = time.perf_counter()
    if kind == "openvino":
        session, run = openvino_open(path, threads)
    else:
        session = session_open(path, threads=threads, prepack=kind != "packed-np")
        name = session.get_inputs()[0].name

        def run(batch):
            return session.run(None, {name: batch})[0]
    opened = time.perf_counter() - started
    batch = np.linspace(-2, 2, 3 * height * width, dtype=np.float32).reshape(1, 3, height, width)
    times = []
    for _ in range(1 + forwards):
        started = time.perf_counter()
        output = run(batch)
        times.append(time.perf_counter() - started)
    return {"open_s": opened, "first_s": times[0], "steady_s": statistics.median(times[1:]),
            "floor_mb": floor, "peak_mb": status_mb("VmHWM"),
            "checksum": float(np.abs(output).astype(np.float64).sum())}


def artifacts_for(model: str) -> tuple[Path, Path, tuple[int, int], int]:
    """(plain file, packed file, native input, weight bytes), exported on the first run."""
    from inference.nets import get_config

    folder = WORKDIR / model
    plain, packed = folder / "plain.onnx", folder / "packed" / f"{model}.onnx"
    config = get_config(model)
    if not (plain.exists() and packed.exists()):
        from inference.nets import create_model
        from inference.runtime.export import network_export
        from inference.runtime.pack import pack_write
        from models_registry.detweights import det_state_dict

        packed.parent.mkdir(parents=True, exist_ok=True)
        network = create_model(model, state_dict=det_state_dict(model)).eval()
        print(f"exporting {model} ...", file=sys.stderr, flush=True)
        network_export(network, config, plain)
        pack_write(plain, packed, name=packed.name)
    from models_registry.catalogue import approx_bytes

    return plain, packed, tuple(config.net_size), approx_bytes(model)


def measure(model: str, runs: int, forwards: int, kinds: tuple[str, ...] = KINDS) -> dict:
    plain, packed, (height, width), weight_bytes = artifacts_for(model)
    paths = {"plain": plain, "packed": packed, "packed-np": packed, "openvino": packed}
    samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            result = subprocess.run([sys.executable, __file__, "--child", kind, str(paths[kind]), str(height),
                                     str(width), str(forwards)], capture_output=True, text=True, check=True,
                                    cwd=ROOT)
            samples[kind].append(json.loads(result.stdout.strip().splitlines()[-1]))
    row = {"model": model, "input": f"{height}x{width}", "weight_mb": weight_bytes / 1e6,
           "plain_mb": plain.stat().st_size / 1e6, "packed_mb": packed.stat().st_size / 1e6, "kinds": {}}
    for kind in kinds:
        medians = {key: statistics.median(s[key] for s in samples[kind])
                   for key in ("open_s", "first_s", "steady_s")}
        medians["peak_over_floor_mb"] = statistics.median(s["peak_mb"] - s["floor_mb"] for s in samples[kind])
        medians["peak_x_weights"] = medians["peak_over_floor_mb"] * 1e6 / weight_bytes
        checksums = {round(s["checksum"], 1) for s in samples[kind]}
        medians["checksum"] = sorted(checksums)
        row["kinds"][kind] = medians
    base = row["kinds"]["plain"]
    for kind in kinds:
        k = row["kinds"][kind]
        k["open_x"] = k["open_s"] / base["open_s"]
        k["first_map_x"] = (k["open_s"] + k["first_s"]) / (base["open_s"] + base["first_s"])
    fast, lean = row["kinds"]["packed"], row["kinds"]["packed-np"]
    saved = (fast["open_s"] + fast["first_s"]) - (lean["open_s"] + lean["first_s"])
    lost = lean["steady_s"] - fast["steady_s"]
    row["crossover_images"] = (1 + saved / lost) if lost > 0 else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="DPT_Large,MiDaS_small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO on the packed file (pip install openvino)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "PATH", "H", "W", "FORWARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, path, height, width, forwards = args.child
        print(json.dumps(child(kind, path, int(height), int(width), int(forwards))))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    kinds = KINDS + ("openvino",) if args.openvino else KINDS
    rows = [measure(model, args.runs, args.forwards, kinds) for model in args.models.split(",") if model]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"threads {os.environ['OMP_NUM_THREADS']}, medians of {args.runs} fresh processes, "
          f"steady forward = median of {args.forwards}")
    print(f"{'model':26} {'kind':10} {'open s':>7} {'first s':>8} {'steady s':>9} {'open x':>7} "
          f"{'1st map x':>9} {'peak MB':>8} {'x weights':>9}")
    for row in rows:
        for kind in row["kinds"]:
            k = row["kinds"][kind]
            print(f"{row['model']:26} {kind:10} {k['open_s']:7.2f} {k['first_s']:8.2f} {k['steady_s']:9.2f} "
                  f"{k['open_x']:6.2f}x {k['first_map_x']:8.2f}x {k['peak_over_floor_mb']:8.0f} "
                  f"{k['peak_x_weights']:8.2f}x")
        crossover = row["crossover_images"]
        print(f"{row['model']:26} repacking pays from {crossover:.1f} images per process" if crossover else
              f"{row['model']:26} repacking did not make the steady forward faster in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
