"""A base for depthsite's commands: domain errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_registry.exceptions import ApplicationError


class CliError(CommandError):
    """Raised from handle() for a clean one-line error with a given exit code."""


class RegistryCommand(BaseCommand):
    requires_system_checks: list = []

    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except ApplicationError as exc:
            self._fail(exc.message, exc.exit_code)
        except CliError as exc:
            self._fail(str(exc), exc.returncode)

    def _fail(self, message: str, code: int):
        if getattr(self, "_called_from_command_line", False):
            self.stderr.write(f"error: {message}")
            sys.exit(code)
        raise CommandError(message, returncode=code)

    def print_json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))

    def confirm(self, question: str) -> bool:
        """Ask on a terminal; never assume consent without one."""
        if not sys.stdin.isatty():
            return False
        answer = input(f"{question} [y/N] ").strip().lower()
        return answer in ("y", "yes")
