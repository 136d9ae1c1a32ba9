"""Forward-pass benchmark: plain fp32 eager PyTorch against the path jobs and `predict` use, in one process.

    .venv/bin/python bench/forward.py [--models MiDaS_small,DPT_Hybrid] [--repeats 5] [--threads 2] [--json]
    .venv/bin/python bench/forward.py --write       # also store the measured times in cpu_times.json
    .venv/bin/python bench/forward.py --markdown    # the README's models table from cpu_times.json, no run

For each registered network at its native input size, in the same process and thread setting:
  baseline   the official computation: the network in fp32 eager PyTorch (torch.inference_mode)
  depthsite  what a CPU worker runs by default (DEPTHSITE_RUNTIME=auto): the ONNX Runtime artifact that
             inference.runtime.artifacts exports and checks, opened with the runtime's session options
The two alternate run by run on the same input (median of --repeats after one warm-up each), and the
outputs are compared: max |depthsite - baseline| / range(baseline). Networks carry the tests' deterministic
weights (models_registry/detweights; --weights random for a seeded initialisation): weight values do not change the
cost, but a random head can output a constant, leaving nothing to compare. Pre- and postprocessing of a
640x480 photo are timed too, torch transforms against the numpy twin the ONNX path uses. Nothing here is a stored reference:
every ratio comes from this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_TIMES = ROOT / "models_registry" / "catalogue" / "cpu_times.json"
PHOTO = (480, 640)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def build_network(name: str, weights: str):
    """The network with random (seeded) or deterministic test weights; the latter give every network a
    non-constant output to compare (a random head may output a constant)."""
    import torch

    from inference.nets import create_model

    torch.manual_seed(0)
    network = create_model(name).eval()
    if weights == "random":
        return network
    from depthsite.netspecs import net_spec

    if net_spec(name).family in ("beit", "swin2", "swin", "levit"):
        from models_registry.detweights import det_rule_state_dict

        # The official layout less the structural buffers, which the network recomputes.
        state_dict = det_rule_state_dict(name)
    else:
        from models_registry.detweights import det_state_dict

        state_dict = det_state_dict(name)
    del network
    return create_model(name, state_dict=state_dict).eval()


def _side_by_side(network, session, batch, repeats: int):
    """Eager and the ONNX session on one input, alternating run by run after a warm-up that gives both outputs:
    (eager output, eager seconds, ONNX seconds, max |diff| / range of the eager output)."""
    import numpy as np
    import torch

    input_name = session.get_inputs()[0].name
    eager_times, onnx_times = [], []
    with torch.inference_mode():
        eager = network(torch.from_numpy(batch)).float().numpy()
        fast = session.run(None, {input_name: batch})[0]
        for _ in range(repeats):
            begin = time.perf_counter()
            network(torch.from_numpy(batch))
            eager_times.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            session.run(None, {input_name: batch})
            onnx_times.append(time.perf_counter() - begin)
    spread = float(eager.max() - eager.min())
    # A randomly initialised head may output a constant (ReLU of all-negative): then there is no range to compare to.
    diff = float(np.abs(fast.astype(np.float64) - eager).max() / spread) if spread > 0 else None
    return eager, eager_times, onnx_times, diff


def measure(name: str, repeats: int, threads: int, workdir: Path, weights: str = "det") -> dict:
    import numpy as np
    import torch

    from inference.health import probe_input
    from inference.nets import get_config
    from inference.nets import transforms as torch_transforms
    from inference.runtime import transforms as numpy_transforms
    from inference.runtime.export import network_export
    from inference.runtime.onnx import session_open
    from inference.runtime.pack import pack_write

    config = get_config(name)
    network = build_network(name, weights)
    height, width = config.net_size
    batch = probe_input(height, width)
    exported = workdir / f"{name}.export.onnx"
    path = workdir / f"{name}.onnx"
    started = time.perf_counter()
    network_export(network, config, exported)
    pack_write(exported, path, name=path.name)  # the artifact as the cache stores it (inference.runtime.pack)
    exported.unlink()
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    session = session_open(path, threads)
    open_s = time.perf_counter() - started

    eager, eager_times, onnx_times, diff = _side_by_side(network, session, batch, repeats)
    spread = float(eager.max() - eager.min())

    # Pre- and postprocessing of one photo: the torch transforms (eager path) against the numpy twin.
    from models_registry.detweights import synthetic_image

    image = synthetic_image(*PHOTO)
    size = torch_transforms.target_size(*PHOTO, config)
    prediction = np.ascontiguousarray(eager.reshape(1, *eager.shape[-2:]))
    pre_torch, pre_numpy = [], []
    for _ in range(max(3, repeats)):
        begin = time.perf_counter()
        torch_transforms.postprocess(torch.from_numpy(prediction), PHOTO, config)
        torch_transforms.preprocess(image, config)
        pre_torch.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        numpy_transforms.postprocess(prediction, PHOTO, config, threads=threads)  # as a worker runs them
        numpy_transforms.preprocess(image, config, threads=threads)
        pre_numpy.append(time.perf_counter() - begin)
    # The same comparison at the photo's network input (4:3: not the export size), where the graph resizes its
    # position tables itself; fixed-size networks take their native square for every photo.
    if tuple(size) != (height, width):
        _, photo_eager, photo_onnx, photo_diff = _side_by_side(network, session, probe_input(*size), repeats)
    else:
        photo_eager, photo_onnx, photo_diff = eager_times, onnx_times, diff
    artifact_bytes = path.stat().st_size
    del session, network
    path.unlink()
    for extra in workdir.glob(f"{name}.onnx*"):
        extra.unlink()
    eager_s, onnx_s = _median(eager_times), _median(onnx_times)
    return {"input": [height, width], "eager_s": round(eager_s, 4), "depthsite_s": round(onnx_s, 4),
            "path": "onnx", "ratio": round(onnx_s / eager_s, 3), "max_diff_of_range": diff, "output_range": spread,
            "eager_runs_s": [round(t, 4) for t in eager_times], "depthsite_runs_s": [round(t, 4) for t in onnx_times],
            "export_s": round(export_s, 2), "session_open_s": round(open_s, 3), "artifact_bytes": artifact_bytes,
            "photo_pre_post_torch_s": round(_median(pre_torch), 4),
            "photo_pre_post_numpy_s": round(_median(pre_numpy), 4), "photo": list(PHOTO), "photo_net_input": list(size),
            "photo_ratio": round(_median(photo_onnx) / _median(photo_eager), 3), "photo_max_diff_of_range": photo_diff,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _diff_text(diff: float | None) -> str:
    return "constant output" if diff is None else f"{diff:.1e}"


def describe_machine(torch_version: str, ort_version: str, threads: int) -> str:
    """The machine in words, saying so when other processes were competing for its CPUs."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = f"; BUSY: load {load:.1f} on {cores} cores, absolute figures inflated (ratios less so)" if load > cores else ""
    # The processor with its widest vector units: the same 2 cores time differently on AVX2, AVX-512 and AMX.
    from inference.runtime.cpu import cpu_name

    return (f"{cpu_name()}, {cores} cores, torch {torch_version}, onnxruntime "
            f"{ort_version}, {threads} thread{'s' if threads != 1 else ''}, load {load:.1f} at start{busy}")


def write(results: dict, *, threads: int, repeats: int, machine: str, path: Path = CPU_TIMES) -> None:
    """Merge into cpu_times.json (models not measured now keep their figures), atomically."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data["machine"] = machine
    plural = "s" if threads != 1 else ""
    data["note"] = ("median forward seconds per image at the native input on the default CPU path (the ONNX Runtime "
                    "artifact, float32), "
                    f"{threads} thread{plural}, {repeats} runs after one warm-up; eager_s is plain fp32 eager PyTorch "
                    "in the same run (bench/forward.py --write)")
    models = data.setdefault("models", {})
    for name, result in results.items():
        models[name] = {"input": result["input"], "median_s": result["depthsite_s"], "path": result["path"],
                        "eager_s": result["eager_s"], "ratio": result["ratio"],
                        "runs_s": result["depthsite_runs_s"], "measured_at": result["measured_at"]}
    data["models"] = dict(sorted(models.items()))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def markdown() -> str:
    """The README's models table: catalogue facts and the CPU times measured by --write (both paths)."""
    from models_registry.catalogue import CATALOGUE, _cpu_times, cpu_seconds, cpu_times_machine

    measured = _cpu_times().get("models", {})
    lines = ["| model | family | licence | size | native input | CPU path | CPU s/image (depthsite) | eager fp32 s/image | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in CATALOGUE:
        seconds = cpu_seconds(entry.architecture)
        facts = measured.get(entry.architecture, {}) if isinstance(measured, dict) else {}
        eager = facts.get("eager_s")
        ratio = facts.get("ratio")
        aspect = "" if entry.spec.keep_aspect_ratio else " (stretched)"
        size = f"{entry.approx_bytes / 1e6:,.0f} MB"
        lines.append(f"| `{entry.name}` | {entry.family_label} | {entry.license} | {size} | "
                     f"{entry.input_size}{aspect} | {facts.get('path', '-')} | "
                     f"{f'{seconds:.3f}' if seconds is not None else 'not measured'} | "
                     f"{f'{eager:.3f}' if eager else '-'} | {f'{ratio:.2f}x' if ratio else '-'} |")
    lines.append("")
    lines.append(f"CPU s/image: median forward at the native input, {cpu_times_machine() or 'not measured yet'}.")
    return "\n".join(lines)


def main() -> None:
    if "--markdown" in sys.argv[1:]:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
        print(markdown())
        return

    import onnxruntime
    import torch

    from inference.nets import NET_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(NET_NAMES),
                        help="comma-separated names (default: every registered network)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch and ONNX Runtime intra-op threads (default: every core)")
    parser.add_argument("--weights", choices=("det", "random"), default="det",
                        help="det: the tests' deterministic weights (default); random: seeded initialisation")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--write", action="store_true", help=f"merge the results into {CPU_TIMES.relative_to(ROOT)}")
    parser.add_argument("--markdown", action="store_true", help="print the README's models table and stop")
    parser.add_argument("--output", type=Path, default=CPU_TIMES, help="the file --write merges into")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in NET_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(NET_NAMES)}")

    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.__version__, onnxruntime.__version__, args.threads)
    out = sys.stderr if args.json else sys.stdout
    print(f"{machine}; median of {args.repeats} alternating runs after one warm-up each", file=out)
    print(f"{'model':<24} {'input':>9} {'baseline':>9} {'depthsite':>10} {'ratio':>6} {'max|diff|/range':>16} "
          f"{'export':>7} {'photo input':>12} {'ratio':>6} {'diff':>8} {'pre+post torch':>15} {'numpy':>7}", file=out)
    results = {}
    with tempfile.TemporaryDirectory(prefix="depthsite-forward-") as workdir:
        for name in names:
            r = measure(name, args.repeats, args.threads, Path(workdir), args.weights)
            results[name] = r
            print(f"{name:<24} {r['input'][0]:>4}x{r['input'][1]:<4} {r['eager_s']:>8.3f}s {r['depthsite_s']:>9.3f}s "
                  f"{r['ratio']:>5.2f}x {_diff_text(r['max_diff_of_range']):>16} {r['export_s']:>6.1f}s "
                  f"{r['photo_net_input'][0]:>5}x{r['photo_net_input'][1]:<6} {r['photo_ratio']:>5.2f}x "
                  f"{_diff_text(r['photo_max_diff_of_range']):>8} {r['photo_pre_post_torch_s']:>14.3f}s {r['photo_pre_post_numpy_s']:>6.3f}s", file=out, flush=True)
    print("baseline: fp32 eager PyTorch; depthsite: the ONNX Runtime artifact a CPU worker uses; "
          f"photo input: the network input of one {PHOTO[1]}x{PHOTO[0]} photo, timed and compared the same way; "
          f"pre+post: that photo's pre- and postprocessing", file=out)
    if args.json:
        print(json.dumps({"machine": machine, "threads": args.threads, "repeats": args.repeats, "models": results},
                         indent=1))
    if args.write:
        write(results, threads=args.threads, repeats=args.repeats, machine=machine, path=args.output)
        print(f"wrote {args.output}", file=out)


if __name__ == "__main__":
    main()
