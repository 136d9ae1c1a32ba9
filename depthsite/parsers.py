"""The API's one JSON parser: a body that is not JSON, or nests deeper than any request needs, is a 400.

DRF's stock parser hands the body to the recursive JSON decoder, so `[[[[...` 100,000 levels deep ends in
RecursionError and a 500. Here the nesting is measured first without recursion (strings skipped), bounded
by MAX_JSON_DEPTH, and anything the decoder still refuses (ValueError, RecursionError) becomes a ParseError.
"""
from __future__ import annotations

import codecs
import re

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json

# No request body of this API nests more than a few levels; 64 leaves room and stays far below the decoder's
# recursion limit.
MAX_JSON_DEPTH = 64

# A JSON string: quote, runs of plain characters or escapes, then its closing quote or the end of the text. An
# unterminated string must match (to the end) too: were the closing quote required, the search would fail there
# and start again at every later quote, each time scanning to the end (quadratic: a 16 kB body of escaped quotes
# took 0.7 s, the 5 MB an address accepts would take hours). The body is invalid then; the decoder says why.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONNestingError(ValueError):
    pass


def check_depth(text: str, limit: int) -> None:
    """JSONNestingError when arrays/objects in `text` nest deeper than `limit` (brackets in strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > limit:
                raise JSONNestingError(f"JSON nested more than {limit} levels deep")
        else:
            depth -= 1


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser with a bound on nesting and every decoder failure reported as a 400."""

    max_depth = MAX_JSON_DEPTH

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = parsers.get_encoding(parser_context or {})
        try:
            text = codecs.getreader(encoding)(stream).read()
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - the body is not valid {encoding} text: {exc}") from None
        try:
            check_depth(text, self.max_depth)
            parse_constant = json.strict_constant if self.strict else None
            return json.loads(text, parse_constant=parse_constant)
        except JSONNestingError as exc:
            raise ParseError(f"JSON parse error - {exc}; send a flatter body") from None
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None

