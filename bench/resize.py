"""Pre- and postprocessing of one photo on the ONNX path (numpy): one thread against the worker's threads.

    .venv/bin/python bench/resize.py [--models MiDaS_small,DPT_Large] [--threads 0] [--repeats 30] [--json]

For photos of three sizes (a phone photo scaled down, 640x480, 12 megapixels) and each model's network input,
it times inference.runtime.transforms.preprocess + postprocess with threads=1 and threads=--threads,
alternating, and reports the medians and their ratio, and whether the two outputs are bit-identical. torch is
not imported: this is what a worker without torch runs around its forward.
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

PHOTOS = ((288, 384), (480, 640), (3000, 4000))


def measure(model: str, photo: tuple[int, int], threads: int, repeats: int) -> dict:
    import numpy as np

    from inference.runtime import transforms
    from models_registry.detweights import synthetic_image

    image = synthetic_image(*photo)
    batch = transforms.preprocess(image, model)
    prediction = np.ascontiguousarray(batch[0, :1])  # a smooth (1, h, w) field at the network's size

    def run(count: int):
        return (transforms.preprocess(image, model, threads=count),
                transforms.postprocess(prediction, photo, model, threads=count))

    one, many = run(1), run(threads)
    same = all(np.array_equal(a, b) for a, b in zip(one, many))
    times: dict[int, list[float]] = {1: [], threads: []}
    for _ in range(repeats):
        for count in (1, threads):
            begin = time.perf_counter()
            run(count)
            times[count].append(time.perf_counter() - begin)
    serial, threaded = statistics.median(times[1]), statistics.median(times[threads])
    return {"model": model, "photo": list(photo), "net_input": list(batch.shape[2:]), "one_thread_ms": serial * 1000,
            "threads": threads, "threaded_ms": threaded * 1000, "ratio": threaded / serial, "bit_identical": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="MiDaS_small,DPT_Large")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of the threaded runs; 0 (default): what a worker uses with DEPTHSITE_TORCH_THREADS=0")
    parser.add_argument("--repeats", type=int, default=30, help="alternating runs of each (fewer for 12 MP)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from inference.runtime.transforms import resize_threads

    args.threads = resize_threads(args.threads)
    rows = [measure(model, photo, args.threads, args.repeats if photo[0] < 1000 else max(3, args.repeats // 10))
            for model in args.models.split(",") for photo in PHOTOS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<14} {'photo':>10} {'net input':>10} {'1 thread':>10} {args.threads:>2} threads {'ratio':>6} {'same bits':>9}")
    for r in rows:
        print(f"{r['model']:<14} {r['photo'][1]:>4}x{r['photo'][0]:<5} {r['net_input'][1]:>4}x{r['net_input'][0]:<5} "
              f"{r['one_thread_ms']:>7.1f} ms {r['threaded_ms']:>7.1f} ms {r['ratio']:>5.2f}x {str(r['bit_identical']):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
