"""`manage.py models download`: fetch one model's weights into the cache and say what happened."""
from __future__ import annotations

from depthsite.units import format_size
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


def handle_download(command, *, model: str, format: str | None = None, offline: bool = False,
                    json: bool = False, **_) -> None:
    target = model_get(name=model, enabled_only=True)
    result = weight_download(
        model=target,
        fmt=format,
        offline=offline or None,
        requested_by="manage.py",
        # Messages go to stderr, like the progress bar: with --json, stdout carries the JSON alone.
        notify=command.stderr.write,
    )
    if json:
        return command.print_json(result.as_dict())
    for line in download_report(result):
        command.stdout.write(line)
    return None
