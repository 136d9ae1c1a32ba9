"""Forward-pass benchmark: time per model at its native input size on this machine's CPU.

    .venv/bin/python bench/forward.py [--models ...] [--runs 5] [--threads 2]

Networks are built with the deterministic official-layout weights (values do not change the cost).
Reference times of the official MiDaS code, 2 threads on the 2-core machine the reference fixtures
were made on: DPT_Large 2.4 s, DPT_Hybrid 1.1 s, MiDaS 0.7 s, MiDaS_small 0.064 s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OFFICIAL_SECONDS = {"DPT_Large": 2.4, "DPT_Hybrid": 1.1, "MiDaS": 0.7, "MiDaS_small": 0.064}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(OFFICIAL_SECONDS), choices=list(OFFICIAL_SECONDS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from inference.nets import create_model, get_config
    from tests.support.detweights import det_state_dict

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} warm runs after one warm-up")
    print(f"{'model':<12} {'input':>9} {'forward':>9} {'official*':>10} {'ratio':>7}")
    for name in args.models:
        network = create_model(name, state_dict=det_state_dict(name))
        height, width = get_config(name).net_size
        batch = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            network(batch)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                network(batch)
                times.append(time.perf_counter() - started)
        median = statistics.median(times)
        official = OFFICIAL_SECONDS[name]
        print(f"{name:<12} {height:>4}x{width:<4} {median:>8.3f}s {official:>9.3f}s {median / official:>6.2f}x", flush=True)
        del network
    print("* official code on the reference machine (not measured here): compare ratios across runs with care")


if __name__ == "__main__":
    main()
