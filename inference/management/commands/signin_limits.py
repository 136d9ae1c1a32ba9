"""`manage.py signin_limits show|clear --user NAME --address ADDR [--json]`: the sign-in limits' counts
(depthsite.auth_limits) in the current windows, and a way to clear them (to let a locked-out user back in).

`--user NAME` is the user name in any case; `clear --user` clears the name's total from every address and its
count from each address. `--address ADDR` is a client address as the limits count it (an IPv6 address stands for
its /64); `clear --address` clears the address's own count. Given both, `show` also shows the name's count from
that address. Bad input: one line on stderr and a non-zero exit (with --json, one error object on stdout too).
"""
from __future__ import annotations

import time

from depthsite import auth_limits
from depthsite.commands import CliError, RegistryCommand


def _row(counter: auth_limits.Counter, now: float) -> dict:
    on, attempts = counter.on, counter.count(now)  # one read of the count
    return {"kind": counter.kind.removeprefix("login_"), "setting": counter.setting,
            "rate": counter.rate if on else "off", "attempts": attempts, "limit": counter.limit,
            "window_seconds": counter.window, "seconds_left": counter.seconds_left(now) if on else None,
            "full": on and attempts >= counter.limit}


class Command(RegistryCommand):
    help = "Show or clear the counts of failed sign-ins for a user name or a client address."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, text in (("show", "the counts in the current windows, with their limits"),
                             ("clear", "clear the counts (a user name's from every address; an address's own)")):
            p = actions.add_parser(action, help=text)
            p.add_argument("--user", metavar="NAME", help="a user name, in any case")
            p.add_argument("--address", metavar="ADDR", help="a client address (IPv6: its /64)")
            p.add_argument("--json", action="store_true")

    def handle(self, *args, action, user=None, address=None, **options):
        if user is None and address is None:
            raise CliError("say whose counts: --user NAME, --address ADDR, or both", code="usage")
        if user is not None and not user.strip():
            raise CliError("--user: the user name is empty", code="usage")
        if address is not None:
            typed, address = address, auth_limits.address_from_text(address)
            if address is None:
                raise CliError(f"--address: {typed!r} is not an IP address", code="usage")
        try:
            if action == "show":
                return self._show(user, address, options["json"])
            return self._clear(user, address, options["json"])
        except ValueError as exc:  # a rate setting that is no rate
            raise CliError(f"the sign-in limits' settings: {exc}", code="settings") from exc

    def _show(self, user: str | None, address: str | None, as_json: bool) -> None:
        now = time.time()
        counters: list[tuple[str, auth_limits.Counter]] = []
        if user is not None:
            counters.append((f"user name {user!r}, from every address", auth_limits.login_user_counter(user)))
        if user is not None and address is not None:
            counters.append((f"user name {user!r}, from {address}", auth_limits.login_pair_counter(user, address)))
        if address is not None:
            counters.append((f"address {address}, any user name", auth_limits.login_address_counter(address)))
        rows = [_row(counter, now) for _, counter in counters]
        if as_json:
            self.print_json({"user": user, "address": address, "counts": rows})
            return
        width = max(len(label) for label, _ in counters)
        for (label, _), row in zip(counters, rows):
            if row["limit"] is None:
                told = f"not counted ({row['setting']}=off)"
            else:
                told = (f"{row['attempts']} of {row['limit']} ({row['setting']}={row['rate']}), "
                        f"window ends in {row['seconds_left']} s")
                if row["full"]:
                    told += ": full, signing in is refused until then"
            self.stdout.write(f"{label.ljust(width)}  {told}")

    def _clear(self, user: str | None, address: str | None, as_json: bool) -> None:
        cleared, said = [], []
        if user is not None:
            auth_limits.clear_login_user(user)
            cleared += ["user", "user_address"]
            said.append(f"user name {user!r} (its total and its count from every address)")
        if address is not None:
            auth_limits.clear_login_address(address)
            cleared.append("address")
            said.append(f"address {address} (its own count; a name's count from it goes with --user NAME)")
        if as_json:
            self.print_json({"user": user, "address": address, "cleared": cleared})
            return
        for line in said:
            self.stdout.write(f"cleared the failed sign-ins of {line}")
