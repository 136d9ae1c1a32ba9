"""What this processor is and which number formats it runs fast, read from Linux's /proc/cpuinfo (no torch).

16-bit floats are only worth running on a CPU where the hardware multiplies them: measured on four 2-core
machines (docs/performance.md), float16 eager ran 1.2-18x slower than float32 on every one, and bfloat16 ran
DPT_Large at 0.31x of float32 on the one with AMX tiles, but slower than the float32 ONNX artifact on the ones
without. So the pool tries bfloat16 only where `bf16_units` names AMX, and keeps it only where it measures faster.
"""
from __future__ import annotations

import functools
import platform

CPUINFO = "/proc/cpuinfo"


@functools.lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {field: value}; empty where there is none (not Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as info:
            first = info.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def cpu_flags() -> frozenset[str]:
    fields = cpu_fields()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def bf16_units() -> str | None:
    """'AMX' where the CPU has AMX tiles that multiply bfloat16 (Intel Sapphire Rapids and later), else None."""
    flags = cpu_flags()
    return "AMX" if {"amx_bf16", "amx_tile"} <= flags else None


def cpu_name() -> str:
    """The processor as Linux names it, with its widest vector units (the same 2 cores time differently with each)."""
    arch = platform.processor() or platform.machine()
    name = " ".join(cpu_fields().get("model name", "").split())
    if not name:
        return arch
    flags = cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    if vector and bf16_units():
        vector += ", AMX"
    return f"{arch} {name}{f' ({vector})' if vector else ''}".strip()
