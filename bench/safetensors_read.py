"""Why depthsite reads safetensors headers itself: memory and time of reading a checkpoint, ours vs safe_open.

    .venv/bin/python bench/safetensors_read.py [--model MiDaS_small] [--runs 3]

Each reader runs in a fresh process on the same file (page cache warm): the time to have every tensor as a
numpy array, and the process's resident memory growth (VmRSS after minus before, and the peak VmHWM) while
they are held. Ours maps the file once, copy-on-write, and gives views (nothing allocated per tensor);
safe_open hands out a new array per tensor. Ratios are of medians measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
import numpy as np
from pathlib import Path
from models_registry.formats.io import read_weights
from safetensors import safe_open
path, reader = Path(sys.argv[1]), sys.argv[2]
before = rss("VmRSS")
started = time.perf_counter()
if reader == "depthsite":
    arrays = read_weights(path, "safetensors").arrays
else:
    with safe_open(str(path), framework="np") as handle:
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}
total = float(sum(float(a.ravel()[0]) for a in arrays.values() if a.size))  # touch one value of each
elapsed = time.perf_counter() - started
print(json.dumps({"s": elapsed, "rss_growth": rss("VmRSS") - before, "peak": rss("VmHWM"), "tensors": len(arrays)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MiDaS_small")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from models_registry.detweights import det_numpy_state_dict
    from models_registry.formats import write_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.safetensors"
        write_weights(det_numpy_state_dict(args.model), path, "safetensors", {})
        size = path.stat().st_size
        results: dict[str, list[dict]] = {"depthsite": [], "safe_open": []}
        for _ in range(args.runs):
            for reader in results:  # alternate, so drift on the machine hits both alike
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), reader, str(ROOT)],
                                     capture_output=True, text=True, timeout=600, check=True)
                results[reader].append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {reader: {key: statistics.median(run[key] for run in runs) for key in ("s", "rss_growth", "peak")}
               for reader, runs in results.items()}
    print(f"{args.model}: {size / 1e6:.0f} MB safetensors, median of {args.runs} fresh processes")
    print(f"{'reader':10} {'time s':>8} {'RSS growth MB':>14} {'peak MB':>8}")
    for reader, m in medians.items():
        print(f"{reader:10} {m['s']:>8.3f} {m['rss_growth'] / 1e6:>14.1f} {m['peak'] / 1e6:>8.1f}")
    ours, theirs = medians["depthsite"], medians["safe_open"]
    print(f"time ratio depthsite/safe_open {ours['s'] / theirs['s']:.2f}x; "
          f"RSS growth {ours['rss_growth'] / 1e6:.1f} MB vs {theirs['rss_growth'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
