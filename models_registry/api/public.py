"""What anonymous readers of the registry (DEPTHSITE_PUBLIC_STATUS) may see: what a user needs to pick a model
and follow a download, nothing about the operators, the machines or the file system.

Signed-in accounts (made by an operator) and staff see everything. Anonymous readers lose: node and worker
names, cache paths and the cache folder, who asked for a download, its source URL (an internal mirror or a
file:// folder), and free-text reasons and errors, which can quote paths or the first bytes of a file; a
fixed sentence per state replaces those.
"""
from __future__ import annotations

from typing import Any

REASON_HIDDEN = "this file failed its checks; an operator can see why"
ERROR_HIDDEN = "the download failed; an operator can see why"


def registry_reader_is_public(user) -> bool:
    """True for a reader who gets the redacted view: anyone not signed in."""
    return not (user is not None and user.is_authenticated)


def weight_file_public(data: dict[str, Any]) -> dict[str, Any]:
    provenance = data.get("provenance")
    if provenance is not None:
        # An internal mirror's URL, an uploaded file's name and who acted are the operators' business.
        provenance = {**provenance, "source": "", "by": ""}
    return {**data, "path": "", "node": "", "health_reason": REASON_HIDDEN if data.get("health_reason") else "",
            "provenance": provenance}


def warm_load_public(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "worker": "", "node": ""}


def download_public(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {**data, "node": "", "source_url": "", "requested_by": "",
            "error": ERROR_HIDDEN if data.get("error") else ""}


def model_status_public(status: dict[str, Any]) -> dict[str, Any]:
    """`selectors.model_status()` as an anonymous reader sees it."""
    return {
        **status,
        "node": "",
        "models": [{**model,
                    "formats": [weight_file_public(f) for f in model["formats"]],
                    "download": download_public(model["download"]),
                    "warm": [warm_load_public(w) for w in model["warm"]]}
                   for model in status["models"]],
    }


def cache_info_public(info: dict[str, Any]) -> dict[str, Any]:
    """`selectors.cache_info()` as an anonymous reader sees it."""
    return {
        **info,
        "cache_dir": "",
        "node": "",
        "models": [{**model, "files": [weight_file_public(f) for f in model["files"]]} for model in info["models"]],
        "warm": [warm_load_public(worker) for worker in info.get("warm", [])],
    }
