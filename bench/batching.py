"""Batching benchmark: does running N images of one model and size as one batch beat N single passes?

    .venv/bin/python bench/batching.py [--models MiDaS_small,DPT_Hybrid] [--sizes 1,2,4] [--repeats 3] [--json]

For each model at its native input, in one process and thread setting: the seconds per image of a batch of N
(N in --sizes) against N=1, for plain fp32 eager PyTorch and for an ONNX Runtime graph exported with a
dynamic batch axis (the same export recipe as the cache's artifacts otherwise). A ratio below 1.00 means the
batch is faster per image: the crossover is the smallest N where that holds. Batched outputs are compared with
single passes (max |diff| / range). Nothing is typed in; every ratio comes from this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = "MiDaS_small,DPT_SwinV2_T_256,Depth_Anything_V2_Small,DPT_Hybrid"


def _export_batched(network, config, path: Path) -> None:
    import torch

    from inference.health import probe_input
    from inference.runtime.export import OPSET

    height, width = config.net_size
    axes = {0: "batch"} if config.fixed_input_size else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.from_numpy(probe_input(height, width)),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["image"], output_names=["depth"],
                          dynamic_axes={"image": axes, "depth": {0: "batch"}}, do_constant_folding=True)


def _per_image(run, batch, repeats: int) -> float:
    run(batch)  # warm-up at this batch size
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - begin)
    return statistics.median(times) / batch.shape[0]


def measure(name: str, sizes: list[int], repeats: int, threads: int, workdir: Path) -> dict:
    import numpy as np
    import torch

    from bench.forward import build_network
    from inference.nets import get_config
    from inference.runtime.onnx import session_open

    config = get_config(name)
    network = build_network(name, "det")
    height, width = config.net_size
    rng = np.random.default_rng(0)
    images = rng.random((max(sizes), 3, height, width), dtype=np.float32)
    path = workdir / f"{name}.onnx"
    _export_batched(network, config, path)
    session = session_open(path, threads)

    def eager(batch):
        with torch.inference_mode():
            return network(torch.from_numpy(batch)).numpy()

    def onnx(batch):
        return session.run(None, {"image": batch})[0]

    single = {"eager": eager(images[:1]), "onnx": onnx(images[:1])}
    rows = []
    base = {}
    for size in sizes:
        batch = images[:size]
        row = {"batch": size}
        for label, run in (("eager", eager), ("onnx", onnx)):
            seconds = _per_image(run, batch, repeats)
            base.setdefault(label, seconds)
            row[f"{label}_s_per_image"] = round(seconds, 4)
            row[f"{label}_ratio"] = round(seconds / base[label], 3)
        first = onnx(batch)[:1]
        spread = float(single["eager"].max() - single["eager"].min()) or 1.0
        row["onnx_batch_vs_single_diff"] = float(np.abs(first - single["onnx"]).max() / spread)
        rows.append(row)
    path.unlink()
    return {"input": [height, width], "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
    import torch

    torch.set_num_threads(args.threads)
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results[name] = measure(name, sizes, args.repeats, args.threads, Path(workdir))
            if not args.json:
                print(f"{name} at {results[name]['input'][0]}x{results[name]['input'][1]}, {args.threads} threads")
                print("    batch   eager s/img  ratio   onnx s/img  ratio   batched-vs-single diff")
                for row in results[name]["rows"]:
                    print(f"    {row['batch']:>5}   {row['eager_s_per_image']:>10.4f}  {row['eager_ratio']:>5.2f}x"
                          f"  {row['onnx_s_per_image']:>10.4f}  {row['onnx_ratio']:>5.2f}x"
                          f"   {row['onnx_batch_vs_single_diff']:.1e}", flush=True)
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "load_at_start": os.getloadavg()[0],
                          "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
