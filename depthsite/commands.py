"""A base for depthsite's commands: domain errors become one line on stderr and a non-zero exit, and with
`--json` also one JSON error object on stdout ({"error": {"code", "message", "hint"}}), so a script that parses
stdout always gets JSON, whether the command worked or not."""
from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable

from django.core.management.base import BaseCommand, CommandError

from depthsite import exceptions
from depthsite.exceptions import ApplicationError

# A stable code per kind of domain error (scripts branch on it); the message says what happened.
ERROR_CODES: dict[type, str] = {
    exceptions.NotFoundError: "not_found",
    exceptions.InvalidRequestError: "invalid",
    exceptions.ConflictError: "conflict",
    exceptions.TooLargeError: "too_large",
    exceptions.WeightFileError: "bad_weights",
    exceptions.DigestMismatchError: "integrity",
    exceptions.OfflineError: "offline",
    exceptions.DownloadError: "download_failed",
    exceptions.DiskFullError: "disk_full",
}
# What to do next, for errors that do not carry their own hint.
ERROR_HINTS: dict[str, str] = {
    "not_found": "`python manage.py models list` shows the catalogue's names and what is cached here",
    "conflict": "wait for the running operation to finish, or pass --force where the command has it",
    "bad_weights": "`python manage.py models verify` names the problem; download again or import a good file",
    "integrity": "if the new file is the one you trust, re-pin: `python manage.py models pin --model M --reset`",
    "offline": ("set DEPTHSITE_MODEL_MIRROR to a mirror, import a file you have (`python manage.py models import "
                "PATH`), or allow the network (unset DEPTHSITE_OFFLINE, drop --offline)"),
    "download_failed": ("set DEPTHSITE_MODEL_MIRROR to a mirror, import a file you have (`python manage.py models "
                        "import PATH`), or use --offline to work from the cache only"),
    "disk_full": "free space (`python manage.py models optimize`) or point DEPTHSITE_CACHE_DIR at a larger disk",
    "internal": "this is a bug: run the command again without --json and with --traceback, and report the output",
}


def _on_its_node(extra: dict[str, Any]) -> str:
    options = "".join(f" --{option} {extra[option]}" for option in ("model", "format") if extra.get(option))
    return f"there, run `DEPTHSITE_NODE={extra['node']} python manage.py models {extra['action']}{options}`"


def _re_pin(extra: dict[str, Any]) -> str:
    step = f"to accept them, reset the pin: `python manage.py models pin --model {extra['model']} --reset`"
    if extra.get("sha256"):
        step += f", or pin this file: `python manage.py models pin --model {extra['model']} --sha256 {extra['sha256']}`"
    return step


# The next step in the CLI's own words, for domain errors that state a fact any door may meet (the service
# says "say which model"; the command says which option does it). The API words the same kinds for its fields.
# A string is filled from the error's `extra` (str.format_map); a function builds the step from it.
CLI_NEXT_STEPS: dict[str, str | Callable[[dict[str, Any]], str]] = {
    "unknown_layout": "pass --model NAME to see what differs",
    "ambiguous_model": "choose one with --model NAME",
    "exists": "pass --force to overwrite it",
    "other_node": _on_its_node,
    "not_cached": "`python manage.py models download --model {model}` (or `models import PATH --model {model}`)",
    "none_usable": "`python manage.py models verify --model {model}` names what is wrong with each file",
    "pin_differs": _re_pin,
    "no_url": "`python manage.py models import PATH --model {model}` imports a local copy",
    "offline": "`python manage.py models import PATH --model {model}` imports it",
    "unreachable": ("here: `python manage.py models import PATH --model {model}` imports a file you have, "
                    "`--offline` works from the cache only"),
    "disk_full": "`python manage.py models optimize --max-size SIZE` frees space",
}


def cli_message(exc: ApplicationError) -> tuple[str, str | None]:
    """(the one line the command prints, its hint) for a domain error."""
    step = CLI_NEXT_STEPS.get(str(exc.extra.get("kind", "")))
    step = step(exc.extra) if callable(step) else step.format_map(exc.extra) if step else None
    message = f"{exc.message}; {step}" if step else exc.message
    return message, step or getattr(exc, "hint", None) or exc.extra.get("hint")


class CliError(CommandError):
    """Raised from handle() for a clean one-line error with a given exit code (and, for --json, a code/hint)."""

    def __init__(self, message: str, *, returncode: int = 2, code: str = "command_failed", hint: str | None = None):
        super().__init__(message, returncode=returncode)
        self.code = code
        self.hint = hint


def error_payload(*, code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint if hint is not None else ERROR_HINTS.get(code)}}


def application_error_code(exc: ApplicationError) -> str:
    own = getattr(exc, "code", None) or exc.extra.get("code")
    if isinstance(own, str) and own:
        return own
    for klass in type(exc).__mro__:
        if klass in ERROR_CODES:
            return ERROR_CODES[klass]
    return "error"


class RegistryCommand(BaseCommand):
    requires_system_checks: list = []

    def run_from_argv(self, argv):
        self._json_output = "--json" in argv[2:]
        if self._json_output:
            self._json_parse_check(argv)
        return super().run_from_argv(argv)

    def _json_parse_check(self, argv) -> None:
        """Argparse's own errors (a missing or unknown option) print usage on stderr and exit 2 with nothing on
        stdout: with --json, parse first with a parser that raises instead, and answer in JSON."""
        parser = self.create_parser(argv[0], argv[1])  # not marked as from the command line: errors raise
        try:
            parser.parse_args(argv[2:])
        except CommandError as exc:
            message = str(exc).removeprefix("Error: ")
            self._emit_json_error(error_payload(
                code="usage", message=message,
                hint=f"`python manage.py {argv[1]} --help` (and `... {argv[1]} ACTION --help`) lists the options"))
            self.stderr.write(f"error: {message}")
            sys.exit(2)

    def execute(self, *args, **options):
        self._json_output = bool(options.get("json")) or getattr(self, "_json_output", False)
        self._json_printed = False
        try:
            return super().execute(*args, **options)
        except ApplicationError as exc:
            message, hint = cli_message(exc)
            self._fail(message, exc.exit_code,
                       payload=error_payload(code=application_error_code(exc), message=message, hint=hint))
        except CliError as exc:
            self._fail(str(exc), exc.returncode, payload=error_payload(code=exc.code, message=str(exc), hint=exc.hint))
        except CommandError as exc:
            self._fail(str(exc), exc.returncode, payload=error_payload(code="command_failed", message=str(exc)))
        except Exception as exc:
            if not self._json_output:
                raise
            # An unexpected failure still answers in JSON; the traceback goes to stderr for the bug report.
            self.stderr.write(traceback.format_exc())
            self._fail(f"{type(exc).__name__}: {exc}", 1,
                       payload=error_payload(code="internal", message=f"{type(exc).__name__}: {exc}"))

    def _fail(self, message: str, code: int, *, payload: dict[str, Any] | None = None):
        # A command that already printed its JSON answer (verify listing bad files) exits non-zero without a
        # second object: stdout stays exactly one JSON document.
        if getattr(self, "_json_output", False) and not getattr(self, "_json_printed", False) and payload:
            self._emit_json_error(payload)
        if getattr(self, "_called_from_command_line", False):
            self.stderr.write(f"error: {message}")
            sys.exit(code)
        raise CommandError(message, returncode=code)

    def _emit_json_error(self, payload: dict[str, Any]) -> None:
        self.print_json(payload)

    def print_json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))
        self._json_printed = True

    def confirm(self, question: str) -> bool:
        """Ask on a terminal; never assume consent without one."""
        if not sys.stdin.isatty():
            return False
        answer = input(f"{question} [y/N] ").strip().lower()
        return answer in ("y", "yes")
