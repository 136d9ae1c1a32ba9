"""Load-time benchmark: depthsite's estimator vs the conventional build-then-load path, in fresh processes.

    .venv/bin/python bench/load.py [--models DPT_Large MiDaS_small ...] [--runs 5]

For each model it generates an official-layout checkpoint once (deterministic weights, cached under
var/bench/), imports it into an isolated registry, warms the page cache, then alternates fresh
processes of each path and times, inside the process, from "imports done" to "ready to predict":

  depthsite     registry resolution -> mmap'd tensors -> network built on the meta device, assign=True
  conventional  network built with normal initialisation -> torch.load -> load_state_dict
  read bytes    reading the checkpoint file into memory (the floor any loader pays without mmap)

It also reports the bare `python -c "import torch, timm"` process time, `manage.py version` against
`manage.py models info` (and `--json`), and the whole-process time of `manage.py predict` to a first depth
map against the conventional script's (random init, torch.load, load_state_dict, forward, PNG). Medians over
the runs; ratios are of medians measured in the same run.
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
BENCH_DIR = ROOT / "var" / "bench"
MODELS = ("DPT_Large", "DPT_Hybrid", "MiDaS", "MiDaS_small")


def site_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "depthsite.settings",
        "DJANGO_SECRET_KEY": "bench-only",  # DEBUG is off by default, and then a key is required
        "DATABASE_URL": f"sqlite:///{BENCH_DIR / 'site' / 'db.sqlite3'}",
        "DEPTHSITE_VAR_DIR": str(BENCH_DIR / "site" / "var"),
        "DEPTHSITE_CACHE_DIR": str(BENCH_DIR / "site" / "cache"),
        "DEPTHSITE_MEDIA_ROOT": str(BENCH_DIR / "site" / "media"),
        "DEPTHSITE_NODE": "bench",
        "DEPTHSITE_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    })
    return env


# --- children: each runs in a fresh process and prints one JSON line ---------------------------


def child_depthsite(model: str) -> dict:
    import django

    django.setup()
    import torch  # noqa: F401  (imports are not part of the timed section)
    import timm  # noqa: F401

    from inference.estimator import EstimatorPool
    from models_registry.selectors import model_get
    from models_registry.services.resolve import weights_use

    pool = EstimatorPool(capacity=1)
    started = time.perf_counter()
    registered = model_get(name=model, enabled_only=True)
    _, estimator = weights_use(model=registered, use=lambda weight_file: pool.get(
        model=registered, weight_file=weight_file, device="cpu"))
    ready = time.perf_counter() - started
    return {"ready_s": ready, "format": estimator.weights_format}


def child_conventional(model: str, path: str) -> dict:
    import torch
    import timm  # noqa: F401

    from inference.nets import create_model

    started = time.perf_counter()
    network = create_model(model, device="cpu")  # normal (random) initialisation of every layer
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state_dict)
    network.eval()
    return {"ready_s": time.perf_counter() - started}


def child_conventional_map(model: str, path: str, photo: str, out: str) -> dict:
    """The conventional way to a first depth map, whole process: build (random init), torch.load,
    load_state_dict, one forward, write a 16-bit PNG (what a torch.hub-style script does)."""
    import numpy as np
    import torch
    import timm  # noqa: F401
    from PIL import Image

    from inference.nets import create_model, postprocess, preprocess

    network = create_model(model, device="cpu")
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    network.eval()
    image = np.asarray(Image.open(photo).convert("RGB"))
    with torch.inference_mode():
        depth = postprocess(network(preprocess(image, model)), image.shape[:2], model)
    scaled = (depth - depth.min()) / max(float(depth.max() - depth.min()), 1e-12) * 65535
    Image.fromarray(scaled.astype(np.uint16)).save(out)
    return {"written": out}


def child_read(path: str) -> dict:
    started = time.perf_counter()
    chunks = []
    with open(path, "rb") as handle:
        while chunk := handle.read(64 * 1024 * 1024):
            chunks.append(chunk)
    size = sum(len(chunk) for chunk in chunks)
    return {"ready_s": time.perf_counter() - started, "bytes": size}


# --- parent -------------------------------------------------------------------------------------


def run_child(args: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed_process(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{result.stderr[-3000:]}")
    return elapsed


def ensure_checkpoint(model: str) -> Path:
    from models_registry.detweights import det_state_dict

    path = BENCH_DIR / "weights" / f"{model}.pt"
    if not path.exists():
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"  generating an official-layout {model} checkpoint (once) ...", flush=True)
        tmp = path.with_suffix(".tmp")
        torch.save(det_state_dict(model), tmp)
        tmp.replace(path)
    return path


def ensure_site(env: dict[str, str], checkpoints: dict[str, Path]) -> None:
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    for model, path in checkpoints.items():
        result = subprocess.run([*manage, "models", "import", str(path), "--model", model, "--json"], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"import of {model} failed: {result.stderr}")
        # The first map is that of a warm cache: the runtime artifact built, as after a first job or
        # `models optimize --build-runtime` (found, not rebuilt, when it is already there).
        result = subprocess.run([*manage, "models", "optimize", "--build-runtime", "--model", model], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the runtime artifact of {model} failed: {result.stderr}")


def warm_up(env: dict[str, str], model: str, photo: Path, out_dir: Path) -> None:
    """One untimed predict, as the first job after a deploy: an artifact built moments ago is hashed once by
    its first lookup, within the ctime margin of its own rename (models_registry.services.verify)."""
    subprocess.run([sys.executable, str(ROOT / "manage.py"), "predict", str(photo), "--model", model, "--output",
                    str(out_dir), "--format", "png", "--offline"], cwd=ROOT, env=env, check=True,
                   capture_output=True)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(64 * 1024 * 1024):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        result = {"depthsite": child_depthsite, "conventional": child_conventional, "read": child_read,
                  "conventional_map": child_conventional_map}[kind](*rest)
        print(json.dumps(result))
        return

    env = site_env()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    checkpoints = {model: ensure_checkpoint(model) for model in args.models}
    ensure_site(env, checkpoints)

    import_times = [timed_process([sys.executable, "-c", "import torch, timm"], env) for _ in range(args.runs)]
    import_s = statistics.median(import_times)
    print(f"bare `python -c 'import torch, timm'` process: median {import_s:.2f} s over {args.runs} runs")
    manage = [sys.executable, str(ROOT / "manage.py")]
    commands = {"version": ["version"], "models info": ["models", "info"], "models info --json": ["models", "info", "--json"]}
    command_s = {name: statistics.median(timed_process([*manage, *argv], env) for _ in range(args.runs))
                 for name, argv in commands.items()}
    print("whole processes, medians: " + ", ".join(
        f"manage.py {name} {seconds:.2f} s" + (f" (+{seconds - command_s['version']:.2f} s)" if name != "version" else "")
        for name, seconds in command_s.items()) + "\n")

    photo = BENCH_DIR / "photo.jpg"
    if not photo.exists():
        from PIL import Image

        from models_registry.detweights import synthetic_image

        Image.fromarray(synthetic_image(480, 640)).save(photo, quality=92)

    header = (f"{'model':<12} {'file':>9} {'read bytes':>11} {'depthsite':>10} {'conventional':>13} "
              f"{'speed-up':>9} {'vs read':>8} {'first map':>10} {'conv. map':>10} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    rows = {}
    for model in args.models:
        path = checkpoints[model]
        warm_page_cache(path)
        times: dict[str, list[float]] = {"read": [], "depthsite": [], "conventional": []}
        for _ in range(args.runs):  # alternate, so drift on the machine hits every path alike
            times["read"].append(run_child(["read", str(path)], env)["ready_s"])
            times["depthsite"].append(run_child(["depthsite", model], env)["ready_s"])
            times["conventional"].append(run_child(["conventional", model, str(path)], env)["ready_s"])
        medians = {kind: statistics.median(values) for kind, values in times.items()}
        out_dir = BENCH_DIR / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        warm_up(env, model, photo, out_dir)
        first_map = statistics.median(
            timed_process([sys.executable, str(ROOT / "manage.py"), "predict", str(photo), "--model", model,
                           "--output", str(out_dir), "--format", "png", "--offline"], env)
            for _ in range(max(1, args.runs // 2)))
        conventional_map = statistics.median(
            timed_process([sys.executable, __file__, "--child", "conventional_map", model, str(path), str(photo),
                           str(out_dir / f"conventional-{model}.png")], env)
            for _ in range(max(1, args.runs // 2)))
        speedup = medians["conventional"] / medians["depthsite"]
        versus_read = medians["depthsite"] / medians["read"]
        rows[model] = {**medians, "speedup": speedup, "vs_read": versus_read, "first_map_s": first_map,
                       "conventional_map_s": conventional_map, "first_map_ratio": first_map / conventional_map,
                       "file_bytes": path.stat().st_size, "runs": args.runs}
        print(f"{model:<12} {path.stat().st_size / 1e9:>7.2f}GB {medians['read']:>10.3f}s {medians['depthsite']:>9.3f}s "
              f"{medians['conventional']:>12.3f}s {speedup:>8.1f}x {versus_read:>7.2f}x {first_map:>9.2f}s "
              f"{conventional_map:>9.2f}s {first_map / conventional_map:>5.2f}x", flush=True)
    print("\nspeed-up = conventional / depthsite; vs read = depthsite / read bytes (both medians, same run);")
    print("first map = whole `manage.py predict` process (imports, registry, load, one 640x480 photo, write);")
    print("conv. map = whole process of the conventional path (random init, torch.load, load_state_dict, forward,")
    print("            16-bit PNG), as a torch.hub-style script does it; ratio = first map / conv. map.")
    (BENCH_DIR / "load.json").write_text(json.dumps({"import_torch_timm_s": import_s, "commands_s": command_s,
                                                     "models": rows}, indent=2))


if __name__ == "__main__":
    main()
