"""What a weight reader hands back (`LoadedWeights`), and the unwrapping of a checkpoint's state_dict that the
pickle-based readers (pt, pkl) share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from depthsite.exceptions import WeightFileError


@dataclass
class LoadedWeights:
    format: str
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    unwrapped: bool = False  # the file held {"model": state_dict, ...}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(array.shape) for key, array in self.arrays.items()}

    @property
    def dtype(self) -> str:
        """The dtype of most floating-point elements ('float32' for the official checkpoints)."""
        counts: dict[str, int] = {}
        for array in self.arrays.values():
            if array.dtype.kind == "f":
                counts[array.dtype.name] = counts.get(array.dtype.name, 0) + array.size
        return max(counts, key=counts.get) if counts else ""


def _plain_mapping(obj: Any) -> Any:
    """A plain dict of a dict (subclass): an unpickled OrderedDict may carry instance attributes (torch
    BUILDs them for `_metadata`) that shadow its methods, so its items are read through dict itself."""
    return dict(dict.items(obj)) if isinstance(obj, dict) else obj


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[Mapping[str, Any], bool]:
    obj = _plain_mapping(obj)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            return _plain_mapping(obj[wrapper]), True
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path.name} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)",
            extra={"kind": "not_state_dict"}, file=path.name,
        )
    return obj, False
