"""`manage.py models ...`: the weight cache from the command line (list, info, verify, convert, export,
import, optimize, clear, pin, download)."""
from __future__ import annotations

import sys
from pathlib import Path

from depthsite.units import format_size, parse_size
from models_registry.catalogue import DEFAULT_MODEL, SEMANTICS, cpu_times_machine
from models_registry.choices import WeightFormat
from depthsite.commands import CliError, RegistryCommand
from models_registry.selectors import cache_info, model_get, model_list, models_by_family, weight_files


NODE_HELP = "the node meant (refused unless it is this one: run the command on that node's machine)"


def _this_node_only(node: str | None, action: str, model: str | None = None, fmt: str | None = None) -> None:
    from models_registry.services.records import node_check

    node_check(node=node or "", action=action, model=model or "", fmt=fmt or "")


class Command(RegistryCommand):
    help = "Manage the model registry and weight cache."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        p = actions.add_parser("list", help="the catalogue, with what is cached on this node")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("info", help="cache statistics")
        p.add_argument("--detailed", action="store_true", help="paths, hashes and verification times")
        p.add_argument("--node", help="show another node's cache records (read-only; default this node)")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("verify", help="check every cached file (exit 1 when any is not ok)")
        p.add_argument("--node", help=NODE_HELP)
        p.add_argument("--model")
        p.add_argument("--format")
        p.add_argument("--no-functional", action="store_true", help="skip running the network on a tiny input")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("convert", help="add a cached copy in another format")
        p.add_argument("--model", required=True)
        p.add_argument("--to", required=True, metavar="FORMAT")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("export", help="write a model's weights to a path")
        p.add_argument("--model", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--format", default="pt")
        p.add_argument("--bundle", action="store_true", help="a .tar with the file and manifest.json")
        p.add_argument("--force", action="store_true", help="overwrite an existing file")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("import", help="add a weight file or bundle to the cache")
        p.add_argument("path")
        p.add_argument("--model")
        p.add_argument("--no-pin", action="store_true",
                       help="do not pin the imported weights (by default an unpinned model is pinned to them)")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("optimize", help="remove corrupt, orphan and stale files; evict to fit a size")
        p.add_argument("--node", help=NODE_HELP)
        p.add_argument("--dry-run", action="store_true", help="show the plan only")
        p.add_argument("--max-size", help="e.g. 10GB (default DEPTHSITE_CACHE_MAX_BYTES)")
        p.add_argument("--build-runtime", action="store_true",
                       help="first build and check the ONNX Runtime artifact of every cached model (or --model)")
        p.add_argument("--model", help="with --build-runtime: this model only")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("clear", help="remove cached files and their records")
        p.add_argument("--node", help=NODE_HELP)
        p.add_argument("--model")
        p.add_argument("--format")
        p.add_argument("--yes", action="store_true", help="do not ask")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("pin", help="show, set or reset a model's pinned sha256")
        p.add_argument("--model", required=True)
        group = p.add_mutually_exclusive_group()
        group.add_argument("--sha256", help="pin this hash of the released file")
        group.add_argument("--reset", action="store_true", help="forget the pin; the next download pins again")
        p.add_argument("--json", action="store_true")

        p = actions.add_parser("download", help="download a model's weights into the cache")
        p.add_argument("--node", help=NODE_HELP)
        p.add_argument("--model", required=True)
        p.add_argument("--format", help="also keep a copy in this format")
        p.add_argument("--offline", action="store_true", help="never touch the network")
        p.add_argument("--json", action="store_true")

    def handle(self, *args, action: str, **options):
        getattr(self, f"do_{action}")(**options)

    # --- list / info ---------------------------------------------------------------------------

    def do_list(self, *, json: bool = False, **_):
        cached: dict[str, list] = {}
        for weight_file in weight_files():
            cached.setdefault(weight_file.model.name, []).append(weight_file)
        groups = models_by_family(model_list())
        rows = []
        for _, members in groups:
            for model, facts in members:
                files = cached.get(model.name, [])
                rows.append({
                    "name": model.name,
                    "display_name": model.display_name,
                    "architecture": model.architecture,
                    "family": facts["family"],
                    "family_label": facts["family_label"],
                    "aliases": model.aliases,
                    "input_size": facts["input_size"],
                    "keep_aspect_ratio": facts["keep_aspect_ratio"],
                    "approx_bytes": facts["approx_bytes"],
                    "cpu_seconds": facts["cpu_seconds"],
                    "file_name": model.file_name,
                    "source_url": model.source_url,
                    "license": model.license,
                    "license_note": facts["license_note"],
                    "license_accepted": facts["license_accepted"],
                    "semantics": model.semantics,
                    "enabled": model.enabled,
                    "default": model.name == DEFAULT_MODEL,
                    "pinned": model.pinned,
                    "expected_sha256": model.expected_sha256,
                    "cached": [{"format": f.format, "health": f.health, "size": f.size, "license": f.license}
                               for f in files],
                })
        if json:
            return self.print_json(rows)
        header = (f"  {'MODEL':<24} {'INPUT':>5} {'SIZE':>9} {'CPU s/img':>9}  {'LICENCE':<13} "
                  f"{'CACHED':<22} {'PINNED':<8} FILE")
        by_name = {row["name"]: row for row in rows}
        self.stdout.write(header)
        for label, members in groups:
            self.stdout.write(label)
            for model, _ in members:
                row = by_name[model.name]
                cached_text = ", ".join(f"{c['format']} ({c['health']})" for c in row["cached"]) or "-"
                pin = row["expected_sha256"][:8] if row["expected_sha256"] else "-"
                cpu = f"{row['cpu_seconds']:.2f}" if row["cpu_seconds"] is not None else "-"
                notes = "".join([
                    "" if row["enabled"] else "  (disabled)",
                    "" if row["license_accepted"] else "  (licence refused: DEPTHSITE_ACCEPTED_LICENSES)",
                ])
                name = row["name"] + ("*" if row["default"] else "")
                size = format_size(row["approx_bytes"]) if row["approx_bytes"] else "-"
                self.stdout.write(f"  {name:<24} {row['input_size'] or '-':>5} {size:>9} {cpu:>9}  "
                                  f"{row['license']:<13} {cached_text:<22} {pin:<8} {row['file_name']}{notes}")
        machine = cpu_times_machine()
        self.stdout.write(f"* default model. All predict {SEMANTICS}. CPU s/img: median forward at the native "
                          f"input{f' ({machine})' if machine else ''}, by bench/forward.py.")

    def do_info(self, *, detailed: bool = False, json: bool = False, node: str | None = None, **_):
        from models_registry import cachefs

        elsewhere = bool(node) and node != cachefs.node_name()
        info = cache_info(node=node or None)
        if elsewhere:
            # Another machine's folder and disk are not visible from here: only its records are shown.
            info["read_only"] = True
            info["cache_dir"] = None
            info["disk_free"] = None
        if json:
            return self.print_json(info)
        w = self.stdout.write
        w("Model Cache Information")
        w("=" * 50)
        if info.get("read_only"):
            w(f"Node: {info['node']} (another node's records, read-only; its folder and disk are on that machine)")
        else:
            w(f"Cache Directory: {info['cache_dir']}")
            w(f"Node: {info['node']}")
        w(f"Total Models: {info['totals']['models']}")
        w(f"Total Size: {format_size(info['totals']['bytes'])}")
        w(f"Total Files: {info['totals']['files']}")
        w(f"Cache Health: {info['health']}")
        if info["max_bytes"]:
            w(f"Size Limit: {format_size(info['max_bytes'])}")
        if info["disk_free"] is not None:
            w(f"Free Disk: {format_size(info['disk_free'])}")
        w("")
        w("Format Distribution:")
        for fmt, stats in info["formats"].items():
            if stats["files"]:
                w(f"  {fmt.upper()}: {stats['files']} file{'s' if stats['files'] != 1 else ''} "
                  f"({format_size(stats['bytes'])})")
        if not info["totals"]["files"]:
            w("  (no cached files)")
        for model in info["models"]:
            if not model["files"]:
                continue
            w("")
            w(f"* {model['name']}: {format_size(model['bytes'])}  licence {model['license']}"
              f"{'  [pinned]' if model['pinned'] else ''}")
            for f in model["files"]:
                used = f["last_used_at"][:19].replace("T", " ") if f["last_used_at"] else "never"
                reason = f" - {f['health_reason']}" if f["health_reason"] else ""
                w(f"   {f['format'].upper()}: {f['size_human']}  {f['health']}{reason}  (last used {used})")
                if detailed:
                    w(f"      path: {f['path']}")
                    w(f"      sha256: {f['sha256']}")
                    w(f"      content digest: {f['content_digest']}")
                    w(f"      dtype: {f['dtype']}  verified: {f['verified_at'] or 'never'}  node: {f['node']}")
        w("")
        w("Warm networks (per worker process on this node):")
        for worker in info["warm"]:
            w(f"  {worker['worker']}: {format_size(worker['bytes'])} in {len(worker['models'])} network(s)")
            for warm in worker["models"]:
                size = format_size(warm["bytes"]) if warm["bytes"] is not None else "size unknown"
                w(f"    {warm['model']} on {warm['device']} ({warm['dtype']}): {size}")
        if not info["warm"]:
            w("  (none)")
        if info["problem_files"]:
            w("")
            w("Problems (run `python manage.py models verify`, then `models optimize`):")
            for problem in info["problem_files"]:
                w(f"  {problem}")

    # --- verify / convert / export / import ------------------------------------------------------

    def do_verify(self, *, model=None, format=None, no_functional=False, json=False, node=None, **_):
        from models_registry.services.verify import verify_nothing_summary, weights_verify

        _this_node_only(node, "verify", model, format)
        target = model_get(name=model) if model else None
        fmt = WeightFormat.parse(format).value if format else None
        results = weights_verify(model=target, fmt=fmt, functional=not no_functional)
        bad = [r for r in results if not r.ok]
        if json:
            self.print_json([r.as_dict() for r in results])
        else:
            if not results:
                self.stdout.write(verify_nothing_summary(model=target))
            for result in results:
                self.stdout.write(f"{result.summary}\n    {result.path}")
        if bad:
            raise CliError(f"{len(bad)} of {len(results)} weight file(s) not ok", returncode=1)

    def do_convert(self, *, model, to, json=False, **_):
        from models_registry.services.export import weight_convert

        weight_file = weight_convert(model=model_get(name=model), fmt=to)
        if json:
            from models_registry.selectors import weight_file_data

            return self.print_json(weight_file_data(weight_file))
        self.stdout.write(f"{weight_file.model.name} [{weight_file.format}] cached: {weight_file.path} "
                          f"({format_size(weight_file.size)}, content digest {weight_file.content_digest[:16]}...)")

    def do_export(self, *, model, output, format, bundle=False, force=False, json=False, **_):
        from models_registry.services.export import weight_export

        result = weight_export(model=model_get(name=model), fmt=format, output=Path(output), bundle=bundle,
                               force=force)
        if json:
            return self.print_json(result.as_dict())
        self.stdout.write(f"exported {result.model} ({'bundle of ' if result.bundle else ''}{result.format}) "
                          f"to {result.path} ({format_size(result.size)}, sha256 {result.sha256})")

    def do_import(self, *, path, model=None, no_pin=False, json=False, **_):
        from models_registry.services.imports import weight_import

        result = weight_import(path=Path(path), model_name=model, imported_by="cli", pin=not no_pin)
        if json:
            return self.print_json(result.as_dict())
        self.stdout.write(result.message)

    # --- optimize / clear / pin ------------------------------------------------------------------

    def do_optimize(self, *, dry_run=False, max_size=None, json=False, node=None, build_runtime=False,
                    model=None, **_):
        from models_registry.services.cache import cache_optimize_execute, cache_optimize_plan

        _this_node_only(node, "optimize")
        try:
            max_bytes = parse_size(max_size) if max_size else None
        except ValueError as exc:
            raise CliError(f"--max-size: {exc}") from None
        if model and not build_runtime:
            raise CliError("--model goes with --build-runtime (optimize itself covers the whole cache)")
        builds = []
        if build_runtime and not dry_run:
            from models_registry.services.runtime import runtime_artifacts_build

            builds = runtime_artifacts_build(model=model_get(name=model) if model else None)
        plan = cache_optimize_plan(max_bytes=max_bytes)
        if not dry_run and plan.items:
            plan = cache_optimize_execute(plan=plan)
        if json:
            return self.print_json({**plan.as_dict(), "runtime": [build.as_dict() for build in builds]}
                                   if build_runtime else plan.as_dict())
        w = self.stdout.write
        for build in builds:
            if build.ok:
                w(f"{build.model}: onnx artifact {format_size(build.artifact.size)}, {build.detail}")
            else:
                w(f"{build.model}: no runtime artifact, runs eager: {build.detail}")
        w(f"Cache {plan.cache_dir} on {plan.node}: {format_size(plan.bytes_before)}"
          + (f", limit {format_size(plan.max_bytes)}" if plan.max_bytes else ""))
        if not plan.items:
            w("Nothing to do: no corrupt, orphan, stale or excess files.")
        for item in plan.items:
            w(f"  {item.description}")
        if plan.items:
            if plan.executed:
                w(f"Freed {format_size(plan.freed_bytes)} ({len(plan.items)} items).")
            else:
                w(f"Would free {format_size(plan.bytes_to_free)} ({len(plan.items)} items). "
                  "Run without --dry-run to do it.")
        for error in plan.errors:
            self.stderr.write(f"warning: {error}")

    def do_clear(self, *, model=None, format=None, yes=False, json=False, node=None, **_):
        from models_registry.services.cache import cache_clear

        _this_node_only(node, "clear", model, format)
        target = model_get(name=model) if model else None
        fmt = WeightFormat.parse(format).value if format else None
        what = (f"{target.name}" if target else "every model") + (f" [{fmt}]" if fmt else "")
        if not yes:
            if not sys.stdin.isatty():
                raise CliError(f"refusing to clear {what} without --yes (not a terminal)")
            if not self.confirm(f"Delete the cached weights of {what} on this node?"):
                raise CliError("cancelled")
        result = cache_clear(model=target, fmt=fmt)
        if json:
            return self.print_json(result.as_dict())
        self.stdout.write(result.summary)

    def do_pin(self, *, model, sha256=None, reset=False, json=False, **_):
        from models_registry.services.catalogue import model_pin

        target = model_get(name=model)
        served_before = _usable_copies(target)
        if sha256 or reset:
            target = model_pin(model=target, sha256=sha256 or "", reset=reset, source="operator")
        unserved = served_before - _usable_copies(target)
        data = {"model": target.name, "sha256": target.expected_sha256, "size": target.expected_size,
                "pinned_at": target.sha256_pinned_at, "pinned_from": target.sha256_pinned_from,
                "copies_no_longer_served": unserved}
        if json:
            return self.print_json(data)
        if unserved:
            self.stdout.write(f"{unserved} cached cop{'y' if unserved == 1 else 'ies'} of {target.name} no longer "
                              "served: not proven to hold the pinned weights (the next use downloads them)")
        if target.expected_sha256:
            self.stdout.write(f"{target.name}: pinned sha256 {target.expected_sha256} "
                              f"(from {target.sha256_pinned_from or '?'} at {target.sha256_pinned_at})")
        else:
            self.stdout.write(f"{target.name}: no pinned sha256; the next good download pins one")

    def do_download(self, **options):
        from models_registry.management.download import handle_download

        _this_node_only(options.pop("node", None), "download", options.get("model"), options.get("format"))
        handle_download(self, **options)


def _usable_copies(model) -> int:
    """Usable cached files of a model on every node (what a pin change may stop serving)."""
    from models_registry.choices import Health
    from models_registry.models import WeightFile

    return WeightFile.objects.filter(model=model, health__in=Health.USABLE).count()
