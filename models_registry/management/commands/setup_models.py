"""`manage.py setup_models`: choose catalogue models (on a terminal, or by flags) and download their weights."""
from __future__ import annotations

import re
import sys

from depthsite.units import format_size
from models_registry.catalogue import approx_bytes
from depthsite.exceptions import ApplicationError, NotFoundError
from depthsite.commands import CliError, RegistryCommand
from models_registry.management.download import download_report, terminal_bar
from models_registry.models import RegisteredModel
from models_registry.selectors import model_get, model_list, weight_files
from models_registry.services.download import weight_download

PROMPT_TRIES = 3


class Command(RegistryCommand):
    help = ("Download the weights of catalogue models. On a terminal without --model/--all, shows the catalogue "
            "and asks which; with --noinput (or no terminal) it never asks, and downloads only what "
            "--model/--all name (nothing otherwise).")

    def add_arguments(self, parser):
        parser.add_argument("--model", action="append", default=[], metavar="M",
                            help="a model to download (repeatable)")
        parser.add_argument("--all", action="store_true", help="every enabled model")
        parser.add_argument("--noinput", "--no-input", action="store_true", help="never prompt")
        parser.add_argument("--format", help="also keep a copy in this format")
        parser.add_argument("--offline", action="store_true", help="never touch the network")

    def handle(self, *args, model: list[str], all: bool, noinput: bool, format: str | None = None,
               offline: bool = False, **options):
        if all and model:
            raise CliError("use --model or --all, not both")
        if all:
            chosen = list(model_list(enabled_only=True))
        elif model:
            chosen = _unique([model_get(name=name, enabled_only=True) for name in model])
        elif noinput or not sys.stdin.isatty():
            self.stdout.write("no models selected (pass --model M, repeatable, or --all); nothing downloaded")
            return
        else:
            chosen = self._ask()
            if not chosen:
                self.stdout.write("no models selected; nothing downloaded")
                return

        failures = []
        for target in chosen:
            self.stdout.write(f"== {target.name}")
            try:
                with terminal_bar(target.name) as bar:
                    result = weight_download(model=target, fmt=format, offline=offline or None,
                                             requested_by="setup_models", notify=self.stderr.write, on_progress=bar)
            except ApplicationError as exc:
                # One model failing (a 404, no space) must not stop the others; the exit code tells.
                failures.append(target.name)
                self.stderr.write(f"error: {target.name}: {exc.message}")
                continue
            for line in download_report(result):
                self.stdout.write(f"   {line}")
        done = len(chosen) - len(failures)
        self.stdout.write(f"{done} of {len(chosen)} model(s) ready" + (f"; failed: {', '.join(failures)}"
                                                                       if failures else ""))
        if failures:
            raise CliError(f"{len(failures)} of {len(chosen)} download(s) failed: {', '.join(failures)}",
                           returncode=1)

    def _ask(self) -> list[RegisteredModel]:
        models = list(model_list(enabled_only=True))
        cached: dict[int, list[str]] = {}
        for weight_file in weight_files():
            cached.setdefault(weight_file.model_id, []).append(f"{weight_file.format} ({weight_file.health})")
        self.stdout.write(f"{'#':>2}  {'MODEL':<24} {'SIZE':>10}  {'LICENCE':<13} {'CACHED':<26} DESCRIPTION")
        for number, entry in enumerate(models, 1):
            size = format_size(approx_bytes(entry.architecture))
            cached_text = ", ".join(cached.get(entry.pk, [])) or "-"
            self.stdout.write(f"{number:>2}  {entry.name:<24} {size:>10}  {entry.license:<13} {cached_text:<26} "
                              f"{entry.description}")
        for _ in range(PROMPT_TRIES):
            try:
                answer = input("Models to download (numbers or names, comma-separated; 'all'; empty for none): ")
            except EOFError:
                return []
            try:
                return parse_selection(answer, models)
            except NotFoundError as exc:
                self.stderr.write(exc.message)
        raise CliError("no valid selection")


def parse_selection(answer: str, models: list[RegisteredModel]) -> list[RegisteredModel]:
    """'1, 3' / 'MiDaS_small dpt_large' / 'all' -> models, in the order given."""
    words = [word for word in re.split(r"[\s,]+", answer.strip()) if word]
    if any(word.lower() == "all" for word in words):
        return list(models)
    chosen = []
    for word in words:
        if word.isdigit():
            if not 1 <= int(word) <= len(models):
                raise NotFoundError(f"no model number {word}; choose 1 to {len(models)}")
            chosen.append(models[int(word) - 1])
        else:
            chosen.append(model_get(name=word, enabled_only=True))
    return _unique(chosen)


def _unique(models: list[RegisteredModel]) -> list[RegisteredModel]:
    seen: set[int] = set()
    return [m for m in models if not (m.pk in seen or seen.add(m.pk))]
