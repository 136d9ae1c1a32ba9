"""`manage.py models download`: fetch one model's weights into the cache and say what happened."""
from __future__ import annotations

import contextlib
import shutil
import sys
from typing import Iterator, TextIO

from tqdm import tqdm

from depthsite.units import format_size
from models_registry.fetch import Progress
from models_registry.selectors import model_get
from models_registry.services.download import DownloadResult, weight_download


def download_report(result: DownloadResult) -> list[str]:
    """The lines a person reads after a download (shared with setup_models)."""
    weight_file = result.weight_file
    model = weight_file.model
    where = f"{result.path} ({format_size(weight_file.size)}, sha256 {weight_file.sha256})"
    if not result.transferred:
        return [f"already cached: {model.name} [{weight_file.format}] {where} (no transfer)"]
    lines = [f"downloaded {model.name} from {result.source_url}: {format_size(result.bytes_transferred)} transferred"
             + (f", resumed at {format_size(result.resumed_from)}" if result.resumed_from else "")]
    if result.converted:
        lines.append(f"converted to {weight_file.format}")
    lines.append(f"cached {model.name} [{weight_file.format}] {where}")
    if result.pinned:
        lines.append(f"pinned sha256 {model.expected_sha256} for {model.name} (trust on first use; "
                     f"from {model.sha256_pinned_from})")
    return lines


@contextlib.contextmanager
def terminal_bar(label: str, stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A progress bar for a download on `stream` (stderr) when it is a terminal, as the service's progress
    callback; None where nobody watches (a pipe, a log, a task)."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield None
        return
    # The size from shutil (with its 80x24 fallback), not tqdm's ioctl: a pseudo-terminal that reports 0x0
    # (script, some CI runners) would make tqdm hide the bar entirely.
    screen = shutil.get_terminal_size()
    bar = tqdm(total=None, desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=stream,
               ncols=screen.columns, nrows=screen.lines, mininterval=0.2)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def handle_download(command, *, model: str, format: str | None = None, offline: bool = False,
                    json: bool = False, **_) -> None:
    target = model_get(name=model, enabled_only=True)
    # Messages go to stderr, like the progress bar: with --json, stdout carries the JSON alone.
    with terminal_bar(target.name) as bar:
        result = weight_download(model=target, fmt=format, offline=offline or None, requested_by="manage.py",
                                 notify=command.stderr.write, on_progress=bar)
    if json:
        return command.print_json(result.as_dict())
    for line in download_report(result):
        command.stdout.write(line)
    return None
