"""Build a runtime artifact in a process of its own, so the process that needs it never holds the export.

Exporting and checking DPT_Large's artifact inside a worker set its peak RSS at 4.35x the weights
(docs/performance.md), and imported torch into a process that otherwise runs without it. The child is this
module run with the parent's interpreter, settings and environment; it builds for one recorded weight file
and exits, and the parent reads the artifact's record as any later process would.

    python -m inference.runtime.build_process <weight file id>
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from models_registry.models import RegisteredModel, WeightFile


def artifact_build_in_child(*, model: RegisteredModel, weight_file: WeightFile) -> WeightFile:
    """The artifact of these weights, built by a child process; RuntimeArtifactError when none was made."""
    from inference.exceptions import RuntimeArtifactError
    from inference.runtime.artifacts import BUILD_LIMIT_S, runtime_artifact_find

    try:
        result = subprocess.run([sys.executable, "-m", "inference.runtime.build_process", str(weight_file.pk)],
                                cwd=settings.BASE_DIR, env=os.environ.copy(), capture_output=True, text=True,
                                timeout=BUILD_LIMIT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeArtifactError(f"building the ONNX artifact of {model.name} took over {BUILD_LIMIT_S} s",
                                   extra={"model": model.name}) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise RuntimeArtifactError(lines[-1] if lines else f"the build process exited with {result.returncode}",
                                   extra={"model": model.name})
    artifact = runtime_artifact_find(model=model, weight_file=weight_file)
    if artifact is None:
        raise RuntimeArtifactError(f"the build process recorded no usable ONNX artifact of {model.name}",
                                   extra={"model": model.name})
    return artifact


def accept_sigterm() -> None:
    """Let SIGTERM end this process again. A qcluster worker blocks SIGTERM in its threads (one thread of its own
    takes it: inference.services.workers), and a child inherits its parent's signal mask, exec included: without
    this, `systemctl stop` would leave a build running until systemd's SIGKILL."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def main(argv: list[str]) -> int:
    accept_sigterm()
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
    django.setup()
    from depthsite.exceptions import ApplicationError
    from inference.runtime.artifacts import runtime_artifact_build
    from models_registry.models import WeightFile

    weight_file = WeightFile.objects.select_related("model").filter(pk=int(argv[0])).first()
    if weight_file is None:
        print(f"weight file {argv[0]} is no longer recorded", file=sys.stderr)
        return 1
    try:
        runtime_artifact_build(model=weight_file.model, weight_file=weight_file)
    except ApplicationError as exc:
        print(exc.message, file=sys.stderr)  # the parent's message: its last line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
