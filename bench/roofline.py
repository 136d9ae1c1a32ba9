"""How fast could any fp32 CPU path be? Each network's matrix work against this machine's measured GEMM rate.

    .venv/bin/python bench/roofline.py [--models DPT_Large,MiDaS_small] [--threads 2] [--repeats 3] [--json]

A lower bound, measured in one run: the fastest fp32 matrix product this machine delivers (torch.mm and ONNX
Runtime's MatMul on square and transformer-shaped operands, best of --repeats, same threads), and each network's
floating-point operations at its native input (torch.utils.flop_counter: matrix products, convolutions and
attention; element-wise work is not counted, so the bound is generous). No fp32 runtime can run the network
faster than its FLOPs at that rate, so `floor / eager` is the smallest ratio against eager any fp32 path can
reach here: where it is above a goal (0.6x), that goal needs fewer operations or lower precision, not a
better runtime. Eager and the ONNX artifact are timed alternately beside it (median of --repeats after a
warm-up) to show how close each already is.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (m, k, n): square products and the shapes a ViT-L/16 at 384 runs (577 tokens, width 1024, MLP 4096).
GEMM_SHAPES = ((2048, 2048, 2048), (577, 1024, 4096), (577, 4096, 1024), (577, 1024, 3072))


def _best(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def gemm_rates(threads: int, repeats: int, workdir: Path) -> list[dict]:
    """GFLOP/s of one fp32 matrix product per shape and runtime, the best of `repeats` runs."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from inference.runtime.onnx import session_options

    rows = []
    rng = np.random.default_rng(0)
    for m, k, n in GEMM_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2.0 * m * k * n
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        seconds = _best(lambda: torch.mm(ta, tb), repeats)
        rows.append({"runtime": "torch.mm", "shape": f"{m}x{k}x{n}", "gflop_s": flops / seconds / 1e9})
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
            [onnx.numpy_helper.from_array(b, "b")])
        path = workdir / f"gemm_{m}_{k}_{n}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        seconds = _best(lambda: session.run(None, {"a": a}), repeats)
        rows.append({"runtime": "onnxruntime MatMul", "shape": f"{m}x{k}x{n}", "gflop_s": flops / seconds / 1e9})
    return rows


def network_row(name: str, rate: float, threads: int, repeats: int, workdir: Path) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from forward import build_network  # bench/forward.py: the tests' deterministic weights
    from inference.health import probe_input
    from inference.nets import get_config
    from inference.runtime.export import network_export
    from inference.runtime.onnx import session_open

    config = get_config(name)
    network = build_network(name, "det")
    batch = probe_input(*config.net_size)
    x = torch.from_numpy(batch)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(x)
    flops = float(counter.get_total_flops())
    path = workdir / f"{name}.onnx"
    network_export(network, config, path)
    session = session_open(path, threads)
    eager_times, onnx_times = [], []
    with torch.inference_mode():
        network(x)
        session.run(None, {"image": batch})
        for _ in range(repeats):
            started = time.perf_counter()
            network(x)
            eager_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            session.run(None, {"image": batch})
            onnx_times.append(time.perf_counter() - started)
    path.unlink()
    eager_s, onnx_s = statistics.median(eager_times), statistics.median(onnx_times)
    floor_s = flops / (rate * 1e9)
    del network, session
    return {"model": name, "input": f"{config.net_size[0]}x{config.net_size[1]}", "gflop": flops / 1e9,
            "eager_s": eager_s, "onnx_s": onnx_s, "eager_gflop_s": flops / eager_s / 1e9,
            "onnx_gflop_s": flops / onnx_s / 1e9, "floor_s": floor_s, "floor_vs_eager": floor_s / eager_s,
            "onnx_vs_eager": onnx_s / eager_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MiDaS_small,DPT_Hybrid,DPT_Large")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    with tempfile.TemporaryDirectory(prefix="depthsite-roofline-") as tmp:
        gemms = gemm_rates(args.threads, max(args.repeats, 3), Path(tmp))
        rate = max(row["gflop_s"] for row in gemms)
        rows = [network_row(name.strip(), rate, args.threads, args.repeats, Path(tmp))
                for name in args.models.split(",") if name.strip()]
    if args.json:
        print(json.dumps({"threads": args.threads, "load": os.getloadavg()[0], "gemm": gemms,
                          "gemm_best_gflop_s": rate, "models": rows}, indent=1))
        return 0
    print(f"{args.threads} threads, load {os.getloadavg()[0]:.1f} at the end")
    for row in gemms:
        print(f"  {row['runtime']:<20} {row['shape']:>15}  {row['gflop_s']:7.1f} GFLOP/s")
    print(f"best fp32 GEMM here: {rate:.1f} GFLOP/s\n")
    print(f"{'model':<26}{'input':>9}{'GFLOP':>8}{'eager s':>9}{'GFLOP/s':>9}{'ONNX s':>8}{'GFLOP/s':>9}"
          f"{'ONNX/eager':>11}{'floor s':>9}{'floor/eager':>12}")
    for row in rows:
        print(f"{row['model']:<26}{row['input']:>9}{row['gflop']:>8.1f}{row['eager_s']:>9.3f}{row['eager_gflop_s']:>9.1f}"
              f"{row['onnx_s']:>8.3f}{row['onnx_gflop_s']:>9.1f}{row['onnx_vs_eager']:>10.2f}x{row['floor_s']:>9.3f}"
              f"{row['floor_vs_eager']:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
