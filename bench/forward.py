"""Forward-pass benchmark: CPU time per image of every registered network at its native input size.

    .venv/bin/python bench/forward.py [--models ...] [--runs 5] [--threads 2] [--write]
    .venv/bin/python bench/forward.py --markdown      # the README's models table from cpu_times.json, no run

Networks are built with their normal initialisation (weight values do not change the cost). The table
puts each median next to the official code's forward time from the reference READMEs (measured on
another machine: a 2-core AMD EPYC VM, torch 2 threads). `--write` merges the medians into
models_registry/catalogue/cpu_times.json, which the catalogue, the upload form and `models list` show.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Official forward time (s) at the native size, 2 threads on the reference 2-core machine, from the
# reference READMEs: MiDaS (../midas), v3.1 "fwd timm 0.6.13 (official)", Depth Anything V2 "official model(x) 518x518".
OFFICIAL_SECONDS = {
    "DPT_Large": 2.4, "DPT_Hybrid": 1.1, "MiDaS": 0.7, "MiDaS_small": 0.064,
    "DPT_BEiT_L_512": 7.956, "DPT_BEiT_L_384": 2.731, "DPT_BEiT_B_384": 1.020, "DPT_SwinV2_L_384": 2.098,
    "DPT_SwinV2_B_384": 1.496, "DPT_SwinV2_T_256": 0.261, "DPT_Swin_L_384": 1.488, "DPT_LeViT_224": 0.062,
    "Depth_Anything_V2_Small": 1.13, "Depth_Anything_V2_Base": 1.90, "Depth_Anything_V2_Large": 8.06,
}
CPU_TIMES = ROOT / "models_registry" / "catalogue" / "cpu_times.json"


def measure(name: str, runs: int) -> tuple[tuple[int, int], list[float]]:
    import torch

    from inference.nets import create_model, get_config

    network = create_model(name)
    height, width = get_config(name).net_size
    batch = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        network(batch)  # warm-up
        for _ in range(runs):
            started = time.perf_counter()
            network(batch)
            times.append(time.perf_counter() - started)
    del network
    return (height, width), times


def describe_machine(torch_version: str, threads: int) -> str:
    """The machine in words, saying so when other processes were competing for its CPUs."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = f"; BUSY: load {load:.1f} on {cores} cores, figures inflated" if load > cores else ""
    return (f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch_version}, {threads} "
            f"thread{'s' if threads != 1 else ''}, load {load:.1f} at start{busy}")


def write(results: dict, *, threads: int, runs: int, machine: str, path: Path = CPU_TIMES) -> None:
    """Merge into cpu_times.json (models not measured now keep their figures), atomically."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data["machine"] = machine
    plural = "s" if threads != 1 else ""
    data["note"] = ("median forward seconds per image at the native input, float32 CPU, "
                    f"{threads} torch thread{plural}, {runs} runs after one warm-up (bench/forward.py --write)")
    models = data.setdefault("models", {})
    models.update(results)
    data["models"] = dict(sorted(models.items()))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def markdown() -> str:
    """The README's models table: catalogue facts, the measured CPU times and the reference's official times."""
    from models_registry.catalogue import CATALOGUE, cpu_seconds, cpu_times_machine

    lines = ["| model | family | licence | size | native input | CPU s/image (here) | official s/image (reference) |",
             "|---|---|---|---|---|---|---|"]
    for entry in sorted(CATALOGUE, key=lambda e: (list(OFFICIAL_SECONDS).index(e.name))):
        measured = cpu_seconds(entry.architecture)
        official = OFFICIAL_SECONDS.get(entry.name)
        aspect = "" if entry.spec.keep_aspect_ratio else " (stretched)"
        size = f"{entry.approx_bytes / 1e6:,.0f} MB"
        lines.append(f"| `{entry.name}` | {entry.family_label} | {entry.license} | {size} | "
                     f"{entry.input_size}{aspect} | {f'{measured:.3f}' if measured is not None else 'not measured'} | "
                     f"{f'{official:.3f}' if official is not None else '-'} |")
    lines.append("")
    lines.append(f"CPU s/image: median forward at the native input, {cpu_times_machine() or 'not measured yet'}.")
    return "\n".join(lines)


def main() -> None:
    if "--markdown" in sys.argv[1:]:
        print(markdown())
        return

    import torch

    from inference.nets import NET_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(NET_NAMES), choices=list(NET_NAMES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"merge the medians into {CPU_TIMES.relative_to(ROOT)}")
    parser.add_argument("--markdown", action="store_true", help="print the README's models table and stop")
    parser.add_argument("--output", type=Path, default=CPU_TIMES, help="the file --write merges into")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.__version__, args.threads)
    print(f"{machine}; median of {args.runs} warm runs after one warm-up")
    print(f"{'model':<24} {'input':>9} {'forward':>9} {'official*':>10} {'ratio':>7}")
    results = {}
    for name in args.models:
        (height, width), times = measure(name, args.runs)
        median = statistics.median(times)
        official = OFFICIAL_SECONDS.get(name)
        ratio = f"{median / official:>6.2f}x" if official else "      -"
        official_text = f"{official:>9.3f}s" if official else "         -"
        print(f"{name:<24} {height:>4}x{width:<4} {median:>8.3f}s {official_text} {ratio}", flush=True)
        results[name] = {"input": [height, width], "median_s": round(median, 4),
                         "runs_s": [round(t, 4) for t in times],
                         "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print("* official code on the reference machine (not measured here): compare ratios across runs with care")
    if args.write:
        write(results, threads=args.threads, runs=args.runs, machine=machine, path=args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
