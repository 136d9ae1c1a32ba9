"""The official MiDaS catalogue as data: one frozen entry per model, plus the official key layouts.

Nothing here imports torch: the layouts are JSON lists of (key, shape, dtype) taken from the official
`model.state_dict()` of each architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
RELEASES = "https://github.com/isl-org/MiDaS/releases/download"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEMANTICS = "relative inverse depth (unitless; larger is nearer)"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    display_name: str
    architecture: str
    file_name: str
    source_url: str
    input_size: int
    resize_method: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aliases: tuple[str, ...] = ()
    license: str = "MIT"
    semantics: str = SEMANTICS
    description: str = ""
    expected_size: int | None = None
    expected_sha256: str = ""

    @property
    def preprocessing(self) -> dict:
        return {
            "input_size": self.input_size,
            "resize_method": self.resize_method,
            "ensure_multiple_of": 32,
            "keep_aspect_ratio": True,
            "interpolation": "bicubic (no antialiasing) on float64 image/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name="DPT_Large",
        display_name="MiDaS v3 DPT Large",
        architecture="DPT_Large",
        file_name="dpt_large_384.pt",
        source_url=f"{RELEASES}/v3/dpt_large_384.pt",
        input_size=384,
        resize_method="minimal",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        aliases=("dpt_large", "dpt_large_384", "dpt-large"),
        description="Highest quality, slowest: ViT-L/16 encoder with a DPT decoder (344M parameters).",
    ),
    CatalogueEntry(
        name="DPT_Hybrid",
        display_name="MiDaS v3 DPT Hybrid",
        architecture="DPT_Hybrid",
        file_name="dpt_hybrid_384.pt",
        source_url=f"{RELEASES}/v3/dpt_hybrid_384.pt",
        input_size=384,
        resize_method="minimal",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        aliases=("dpt_hybrid", "dpt_hybrid_384", "dpt-hybrid"),
        description="ViT-B/16 on ResNet-50 features with a DPT decoder (123M parameters).",
    ),
    CatalogueEntry(
        name="MiDaS",
        display_name="MiDaS v2.1",
        architecture="MiDaS",
        file_name="midas_v21_384.pt",
        source_url=f"{RELEASES}/v2_1/midas_v21_384.pt",
        input_size=384,
        resize_method="upper_bound",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        aliases=("midas_v21", "midas_v21_384", "midas-v21"),
        description="ResNeXt-101 32x8d encoder (105M parameters).",
    ),
    CatalogueEntry(
        name="MiDaS_small",
        display_name="MiDaS v2.1 small",
        architecture="MiDaS_small",
        file_name="midas_v21_small_256.pt",
        source_url=f"{RELEASES}/v2_1/midas_v21_small_256.pt",
        input_size=256,
        resize_method="upper_bound",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        aliases=("midas_small", "midas_v21_small", "midas_v21_small_256", "midas-small"),
        description="EfficientNet-Lite3 encoder, fast enough for CPUs (21M parameters).",
    ),
)


@dataclass(frozen=True)
class KeyLayout:
    """The official state_dict of an architecture: ordered keys with shapes and dtypes."""

    architecture: str
    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, shape, _ in self.entries}

    @property
    def required(self) -> dict[str, tuple[int, ...]]:
        """Keys a checkpoint must hold: BatchNorm's num_batches_tracked counters are optional."""
        return {key: shape for key, shape, _ in self.entries if not key.endswith("num_batches_tracked")}

    @property
    def num_elements(self) -> int:
        total = 0
        for _, shape, dtype in self.entries:
            if dtype.startswith("float"):
                count = 1
                for dim in shape:
                    count *= dim
                total += count
        return total

    @property
    def approx_bytes(self) -> int:
        return self.num_elements * 4

    def mismatches(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, list]:
        """Differences between a checkpoint's {key: shape} and this layout (empty lists when equal)."""
        expected = self.shapes
        required = self.required
        missing = sorted(key for key in required if key not in shapes)
        unexpected = sorted(key for key in shapes if key not in expected)
        wrong_shape = sorted(
            (key, list(expected[key]), list(shape))
            for key, shape in shapes.items()
            if key in expected and tuple(expected[key]) != tuple(shape)
        )
        return {"missing": missing, "unexpected": unexpected, "wrong_shape": wrong_shape}

    def matches(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return not any(self.mismatches(shapes).values())


ARCHITECTURES = tuple(entry.architecture for entry in CATALOGUE)


@lru_cache(maxsize=None)
def key_layout(architecture: str) -> KeyLayout:
    path = _HERE / f"keys_{architecture}.json"
    if architecture not in ARCHITECTURES or not path.exists():
        raise KeyError(f"no official key layout for architecture {architecture!r}")
    data = json.loads(path.read_text())
    entries = tuple((key, tuple(shape), dtype) for key, shape, dtype in data["keys"])
    return KeyLayout(architecture=architecture, entries=entries)


def catalogue_entry(name: str) -> CatalogueEntry | None:
    for entry in CATALOGUE:
        if entry.name == name:
            return entry
    return None
