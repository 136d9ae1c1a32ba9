"""What else could make the CPU forward faster: each candidate timed against fp32 eager in one process.

    .venv/bin/python bench/forward_candidates.py [--models MiDaS_small,DPT_Hybrid] [--repeats 5] [--threads 2]
        [--skip compile] [--json]

Candidates, each on the same input at the native size (median of --repeats after a warm-up); the fp32
eager baseline runs before each timed run of a candidate, and each ratio is against those baseline runs,
so both saw the same load: channels_last, bfloat16 and
float16 eager, torch.compile (its compile cost reported apart), the ONNX artifact under each graph
optimisation level and with 1 thread or all, OpenVINO's CPU plugin on the same graph where it is installed
(the ratio of that row is OpenVINO / ONNX Runtime), the artifact against the same graph with timm's "same"
padding worked out at run time (the ratio of that row is artifact / that graph), the artifact against the same
graph with its attention unfused (likewise), SwinV2's artifact against the same graph with its score scale and
normalisation as exported (likewise), and the artifact after ORT's
transformer fusions
(onnxruntime.transformers: LayerNorm, GELU and attention subgraphs into its contrib operators).
max|diff|/range is against the fp32 eager output.
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


def timed(run, repeats: int, baseline=None) -> tuple[float, object, float | None]:
    """Median seconds of `run` (after a warm-up); with `baseline`, that one runs before each timed run and
    its median comes back too, so that a ratio compares runs made under the same load."""
    output = run()  # warm-up
    times, base_times = [], []
    for _ in range(repeats):
        if baseline is not None:
            started = time.perf_counter()
            baseline()
            base_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), output, (statistics.median(base_times) if base_times else None)


def candidates_for(name: str, repeats: int, threads: int, skip: set[str], workdir: Path) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from inference.health import probe_input
    from inference.nets import create_model, get_config
    from inference.runtime.export import network_export
    from inference.runtime.onnx import session_options

    sys.path.insert(0, str(ROOT / "bench"))
    from forward import build_network  # bench/forward.py: the tests' deterministic weights

    config = get_config(name)
    network = build_network(name, "det")
    batch = probe_input(*config.net_size)
    x = torch.from_numpy(batch)
    rows = []

    def eager(net, tensor):
        def run():
            with torch.inference_mode():
                return net(tensor).float().numpy()
        return run

    base_run = eager(network, x)
    baseline_s, reference, _ = timed(base_run, repeats)
    spread = float(reference.max() - reference.min()) or 1.0

    def add(label: str, seconds: float, output, extra: str = "", base: float | None = None) -> None:
        diff = float(np.abs(np.asarray(output, dtype=np.float64) - reference).max() / spread)
        rows.append({"model": name, "candidate": label, "seconds": round(seconds, 4),
                     "ratio": round(seconds / (base or baseline_s), 3), "max_diff_of_range": diff, "note": extra})

    add("eager fp32 (baseline)", baseline_s, reference)
    if "channels_last" not in skip:
        net_cl = network.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        reference_net = create_model(name).eval()
        reference_net.load_state_dict(net_cl.state_dict())
        seconds, out, base = timed(eager(net_cl, x_cl), repeats, eager(reference_net, x))
        add("eager fp32 channels_last", seconds, out, base=base)
        del reference_net
        network = network.to(memory_format=torch.contiguous_format)
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if label in skip:
            continue
        try:
            net_half = create_model(name).eval().to(dtype)
            net_half.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                      for k, v in network.state_dict().items()})
            seconds, out, base = timed(eager(net_half, x.to(dtype)), max(1, repeats // 2), base_run)
            add(f"eager {label}", seconds, out, base=base)
            del net_half
        except RuntimeError as exc:
            rows.append({"model": name, "candidate": f"eager {label}", "seconds": None, "ratio": None,
                         "max_diff_of_range": None, "note": f"fails: {str(exc)[:80]}"})
    if "compile" not in skip:
        try:
            compiled = torch.compile(network)
            started = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
            compile_s = time.perf_counter() - started
            seconds, out, base = timed(eager(compiled, x), repeats, base_run)
            add("torch.compile (inductor)", seconds, out, f"first call (compile) {compile_s:.1f} s", base=base)
        except Exception as exc:  # inductor needs a C++ toolchain; any failure is the finding
            rows.append({"model": name, "candidate": "torch.compile (inductor)", "seconds": None, "ratio": None,
                         "max_diff_of_range": None, "note": f"fails: {type(exc).__name__}: {str(exc)[:80]}"})

    path = workdir / f"{name}.onnx"
    network_export(network, config, path)
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    for label, level in levels.items() if "levels" not in skip else ():
        options = session_options(threads)
        options.graph_optimization_level = level
        started = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        open_s = time.perf_counter() - started
        seconds, out, base = timed(lambda: session.run(None, {"image": batch})[0], repeats, base_run)
        add(f"onnx, optimisation {label}, {threads} threads", seconds, out, f"session open {open_s:.2f} s", base=base)
    for count in sorted({1, threads}) if "levels" not in skip else (threads,):
        session = ort.InferenceSession(str(path), session_options(count), providers=["CPUExecutionProvider"])
        seconds, out, base = timed(lambda: session.run(None, {"image": batch})[0], repeats, base_run)
        add(f"onnx, optimisation all, {count} thread{'s' if count != 1 else ''}", seconds, out, base=base)

    if "openvino" not in skip:
        # OpenVINO's CPU plugin on the same ONNX graph, in float32 (on a CPU with bfloat16 units it would otherwise
        # pick bfloat16), one stream, the same threads. Its ratio is against ONNX Runtime on that graph, the two
        # alternating: against eager it would be flattered, as the eager run right after it was slowed here.
        try:
            import openvino
        except ImportError:
            rows.append({"model": name, "candidate": "openvino", "seconds": None, "ratio": None,
                         "max_diff_of_range": None, "note": "not installed (pip install openvino)"})
        else:
            started = time.perf_counter()
            compiled = openvino.Core().compile_model(str(path), "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                "INFERENCE_NUM_THREADS": str(threads)})
            compile_s = time.perf_counter() - started
            request = compiled.create_infer_request()
            seconds, out, base = timed(lambda: request.infer({0: batch})[0].copy(), repeats,
                                       lambda: session.run(None, {"image": batch})[0])
            add(f"openvino {openvino.__version__.split('-')[0]} f32 (vs. onnx)", seconds, out,
                f"compile {compile_s:.2f} s; ONNX Runtime on the same graph {base:.4f} s", base=base)
            del request, compiled

    def against_plain_export(label: str, counted: str, **options) -> None:
        # The artifact against the same network exported without one of its rewrites; the ratio is the
        # artifact's time over that graph's.
        other_path = workdir / f"{name}.other.onnx"
        network_export(network, config, other_path, **options)
        other = ort.InferenceSession(str(other_path), session_options(threads), providers=["CPUExecutionProvider"])
        import onnx

        count = sum(node.op_type == counted for node in onnx.load(str(path)).graph.node)
        seconds, out, base = timed(lambda: session.run(None, {"image": batch})[0], repeats,
                                   lambda: other.run(None, {"image": batch})[0])
        add(label, seconds, out, f"{counted} nodes in the artifact {count}; the other graph {base:.4f} s", base=base)
        del other
        other_path.unlink()

    if "padding" not in skip:
        # timm's TensorFlow-style "same" convolutions (MiDaS_small): the artifact fixes their padding and folds it
        # into each Conv (inference/runtime/graph.py); before 2026-12-07 the graph worked it out at run time and
        # kept a Pad before each stride-2 Conv.
        against_plain_export("onnx, same padding fixed and folded (vs. worked out at run time)", "Pad",
                             fix_padding=False)
    if "attention" not in skip:
        # ViT, DINOv2 and BEiT blocks: the artifact runs each self-attention as ORT's fused MultiHeadAttention
        # (inference/runtime/graph.py; BEiT's since the 2026-12-07 evening); before it ran MatMul, Softmax and MatMul.
        against_plain_export("onnx, attention fused (vs. MatMul, Softmax, MatMul)", "MultiHeadAttention",
                             fuse_attention=False)
    if "cosine" not in skip and config.family == "swin2":
        # SwinV2's cosine attention: the artifact multiplies the queries by each head's scale instead of the (N, N)
        # scores, and divides by the q and k norms without expanding them (inference/runtime/graph.py; recipe 2).
        against_plain_export("onnx, SwinV2 scale on the queries, norms not expanded (vs. as exported)", "Expand",
                             cosine_attention=False)
    del session
    if "fusions" not in skip:
        # ORT's transformer optimiser: LayerNorm, GELU and attention subgraphs fused into its contrib operators.
        try:
            from onnxruntime.transformers import optimizer

            fused_path = workdir / f"{name}.fused.onnx"
            started = time.perf_counter()
            attention = next(m for m in network.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv"))
            fused = optimizer.optimize_model(str(path), model_type="vit", num_heads=attention.num_heads,
                                             hidden_size=attention.qkv.in_features, opt_level=0, use_gpu=False)
            fused.save_model_to_file(str(fused_path))
            fuse_s = time.perf_counter() - started
            counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
            session = ort.InferenceSession(str(fused_path), session_options(threads), providers=["CPUExecutionProvider"])
            seconds, out, base = timed(lambda: session.run(None, {"image": batch})[0], repeats, base_run)
            add("onnx + transformer fusions", seconds, out, f"fusing {fuse_s:.1f} s; fused {counts}", base=base)
            del session, fused
            fused_path.unlink()
        except Exception as exc:  # any failure is the finding
            rows.append({"model": name, "candidate": "onnx + transformer fusions", "seconds": None, "ratio": None,
                         "max_diff_of_range": None, "note": f"fails: {type(exc).__name__}: {str(exc)[:80]}"})
    path.unlink()
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="MiDaS_small,DPT_Hybrid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", default="",
                        help="comma-separated: channels_last,bf16,fp16,compile,levels,openvino,padding,attention,cosine,fusions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = {item.strip() for item in args.skip.split(",") if item.strip()}
    load = os.getloadavg()[0]
    out = sys.stderr if args.json else sys.stdout
    print(f"{os.cpu_count()} cores, load {load:.1f}, torch {torch.__version__}, {args.threads} threads", file=out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthsite-candidates-") as workdir:
        for name in [n.strip() for n in args.models.split(",") if n.strip()]:
            for row in candidates_for(name, args.repeats, args.threads, skip, Path(workdir)):
                rows.append(row)
                seconds = f"{row['seconds']:.3f}s" if row["seconds"] is not None else "-"
                ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
                diff = f"{row['max_diff_of_range']:.1e}" if row["max_diff_of_range"] is not None else "-"
                print(f"{name:<14} {row['candidate']:<40} {seconds:>9} {ratio:>7} {diff:>9}  {row['note']}",
                      file=out, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
