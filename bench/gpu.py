"""DPT_Large on a CUDA GPU: latency and images/s at 384x384, fp32 and fp16, batch 1 and 8 (run by bench/gpu.sh).

Weights are the official layout filled by the deterministic rule (models_registry/detweights.py): the
timings do not depend on the values, and fp16 is checked against fp32 on the same weights and inputs.
Every figure comes from this run: the baseline is eager fp32 at batch 1, and each row is a ratio to it.
Exits 0 with one line where CUDA is absent (torch without CUDA, or no device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "DPT_Large"
SIZE = 384


def _time(run, repeats: int) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: skipped, torch sees no CUDA device")
        return 0
    from inference.nets import create_model
    from models_registry.detweights import det_state_dict, synthetic_image

    device = torch.device("cuda")
    network = create_model(MODEL, state_dict=det_state_dict(MODEL), device="cuda").eval()
    image = torch.from_numpy(synthetic_image(SIZE, SIZE)).permute(2, 0, 1).float().div(255)
    single = ((image - 0.5) / 0.5)[None].to(device)
    rows = []
    with torch.inference_mode():
        reference = network(single).float()
        for dtype in (torch.float32, torch.float16):
            net = network.to(dtype)
            for batch in (1, 8):
                inputs = single.to(dtype).expand(batch, -1, -1, -1).contiguous()
                for _ in range(3):
                    net(inputs)  # warm-up: cuDNN autotuning and allocator growth are not part of the figure
                times = _time(lambda: net(inputs), args.repeats)
                output = net(inputs)[:1].float()
                diff = float((output - reference).abs().max() / (reference.max() - reference.min()))
                rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch,
                             "latency_s": statistics.median(times), "images_per_s": batch / statistics.median(times),
                             "max_diff_over_range": diff})
            network = network.float()
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_fp32_b1"] = row["images_per_s"] / baseline
    if args.json:
        print(json.dumps({"model": MODEL, "size": SIZE, "device": torch.cuda.get_device_name(0), "rows": rows}))
        return 0
    print(f"{MODEL} {SIZE}x{SIZE} on {torch.cuda.get_device_name(0)} (median of {args.repeats})")
    print(f"{'dtype':8} {'batch':>5} {'latency s':>10} {'img/s':>8} {'x fp32 b1':>9} {'max|d|/range':>13}")
    for row in rows:
        print(f"{row['dtype']:8} {row['batch']:>5} {row['latency_s']:>10.4f} {row['images_per_s']:>8.1f} "
              f"{row['speedup_vs_fp32_b1']:>9.2f} {row['max_diff_over_range']:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
