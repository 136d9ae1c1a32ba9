"""Rates such as "10/15m": how many attempts a window of time allows (plain data, read by the settings too).

DRF's own rates ("30/hour") name one unit only; the sign-in limits (depthsite.auth_limits) want windows like a
quarter of an hour. Both spellings are read here: "N/<unit>" with a unit of s, m, h or d (or a word starting with
one: second, minute, hour, day), and "N/<count><unit>" ("10/15m", "5/2h"). "off" turns a limit off.
"""
from __future__ import annotations

import re

OFF = "off"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WORDS = {"s": ("s", "sec", "second", "seconds"), "m": ("m", "min", "minute", "minutes"),
          "h": ("h", "hour", "hours"), "d": ("d", "day", "days")}
_PERIOD = re.compile(r"(\d*)\s*([a-z]+)")


def parse_rate(text: str | None) -> tuple[int, int] | None:
    """(attempts, seconds) of a rate; None for "off" (or no rate at all); ValueError when it is not one."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == OFF:
        return None
    count, slash, period = value.partition("/")
    match = _PERIOD.fullmatch(period.strip())
    if not slash or not count.strip().isdigit() or match is None:
        raise ValueError(f"{text!r} is not a rate (examples: 10/15m, 30/hour, 5/h; or {OFF})")
    number, unit = match.groups()
    key = next((k for k, words in _WORDS.items() if unit in words), None)
    if key is None:
        raise ValueError(f"{text!r}: the period's unit is one of s, m, h, d (or second, minute, hour, day)")
    attempts, times = int(count), int(number or 1)
    if attempts < 1 or times < 1:
        raise ValueError(f"{text!r}: a rate allows at least 1 attempt in at least 1 {unit} (turn it off with {OFF})")
    return attempts, times * _UNITS[key]
