"""The official catalogue as data: one frozen entry per released checkpoint, plus the official key layouts.

Nothing here imports torch: network facts come from depthsite.netspecs, the layouts are JSON lists of
(key, shape, dtype) taken from the official `model.state_dict()` of each architecture, CPU times from
`cpu_times.json` (written by `bench/forward.py --write`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from depthsite.netspecs import FAMILIES, NET_NAMES, NetSpec, net_spec

_HERE = Path(__file__).resolve().parent
RELEASES = "https://github.com/isl-org/MiDaS/releases/download"
HUGGING_FACE = "https://huggingface.co/depth-anything"
SEMANTICS = "relative inverse depth (unitless; larger is nearer)"
CPU_TIMES_FILE = _HERE / "cpu_times.json"

# What each licence of a released checkpoint lets a deployment do, in a few words for the pages.
LICENSES: dict[str, str] = {
    "MIT": "permissive: any use, keep the copyright notice",
    "Apache-2.0": "permissive: any use, keep the notices; patent grant",
    "CC-BY-NC-4.0": "non-commercial use only, with attribution",
}


@dataclass(frozen=True)
class CatalogueEntry:
    """A released checkpoint: where it comes from and under which licence. The network facts (native
    input, preprocessing, family) are the architecture's NetSpec, never restated here."""

    name: str
    display_name: str
    architecture: str
    file_name: str
    source_url: str
    approx_bytes: int  # tensor bytes of the official state_dict: the checkpoint's size give or take a few KB
    params: int
    aliases: tuple[str, ...] = ()
    license: str = "MIT"
    semantics: str = SEMANTICS
    description: str = ""
    expected_size: int | None = None
    expected_sha256: str = ""

    @property
    def spec(self) -> NetSpec:
        return net_spec(self.architecture)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def family_label(self) -> str:
        return self.spec.family_label

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def preprocessing(self) -> dict:
        return self.spec.preprocessing


def _v31(name: str, file_name: str, display_name: str, approx_bytes: int, params: int, aliases: tuple[str, ...],
         description: str) -> CatalogueEntry:
    return CatalogueEntry(name=name, display_name=display_name, architecture=name, file_name=file_name,
                          source_url=f"{RELEASES}/v3_1/{file_name}", approx_bytes=approx_bytes, params=params,
                          aliases=aliases, description=description)


def _dav2(size: str, encoder: str, license: str, approx_bytes: int, params: int, description: str) -> CatalogueEntry:
    file_name = f"depth_anything_v2_{encoder}.pth"
    name = f"Depth_Anything_V2_{size}"
    return CatalogueEntry(
        name=name, display_name=f"Depth Anything V2 {size}", architecture=name, file_name=file_name,
        source_url=f"{HUGGING_FACE}/Depth-Anything-V2-{size}/resolve/main/{file_name}?download=true",
        approx_bytes=approx_bytes, params=params, license=license, description=description,
        aliases=(f"depth_anything_v2_{encoder}", f"depth_anything_v2_{size.lower()}", f"dav2_{size.lower()}",
                 f"dav2_{encoder}"),
    )


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name="DPT_Large",
        display_name="MiDaS v3 DPT Large",
        architecture="DPT_Large",
        file_name="dpt_large_384.pt",
        source_url=f"{RELEASES}/v3/dpt_large_384.pt",
        approx_bytes=1_376_221_860,
        params=344_055_465,
        aliases=("dpt_large", "dpt_large_384", "dpt-large"),
        description="Highest quality of MiDaS v3, slow: ViT-L/16 encoder with a DPT decoder (344M parameters).",
    ),
    CatalogueEntry(
        name="DPT_Hybrid",
        display_name="MiDaS v3 DPT Hybrid",
        architecture="DPT_Hybrid",
        file_name="dpt_hybrid_384.pt",
        source_url=f"{RELEASES}/v3/dpt_hybrid_384.pt",
        approx_bytes=492_587_940,
        params=123_146_985,
        aliases=("dpt_hybrid", "dpt_hybrid_384", "dpt-hybrid"),
        description="ViT-B/16 on ResNet-50 features with a DPT decoder (123M parameters).",
    ),
    CatalogueEntry(
        name="MiDaS",
        display_name="MiDaS v2.1",
        architecture="MiDaS",
        file_name="midas_v21_384.pt",
        source_url=f"{RELEASES}/v2_1/midas_v21_384.pt",
        approx_bytes=422_264_132,
        params=105_362_945,
        aliases=("midas_v21", "midas_v21_384", "midas-v21"),
        description="ResNeXt-101 32x8d encoder (105M parameters).",
    ),
    CatalogueEntry(
        name="MiDaS_small",
        display_name="MiDaS v2.1 small",
        architecture="MiDaS_small",
        file_name="midas_v21_small_256.pt",
        source_url=f"{RELEASES}/v2_1/midas_v21_small_256.pt",
        approx_bytes=85_579_204,
        params=21_320_545,
        aliases=("midas_small", "midas_v21_small", "midas_v21_small_256", "midas-small"),
        description="EfficientNet-Lite3 encoder, fast enough for CPUs (21M parameters).",
    ),
    _v31("DPT_BEiT_L_512", "dpt_beit_large_512.pt", "MiDaS v3.1 DPT BEiT-L 512", 1_581_777_764, 345_014_441,
         ("dpt_beit_large_512", "beit_large_512"),
         "Highest quality of MiDaS v3.1, slowest: BEiT-L/16 encoder at 512 px, any aspect ratio (345M parameters)."),
    _v31("DPT_BEiT_L_384", "dpt_beit_large_384.pt", "MiDaS v3.1 DPT BEiT-L 384", 1_441_276_772, 344_338_601,
         ("dpt_beit_large_384", "beit_large_384"),
         "BEiT-L/16 encoder at 384 px, any aspect ratio (344M parameters)."),
    _v31("DPT_BEiT_B_384", "dpt_beit_base_384.pt", "MiDaS v3.1 DPT BEiT-B 384", 478_087_940, 111_531_689,
         ("dpt_beit_base_384", "beit_base_384"),
         "BEiT-B/16 encoder at 384 px, any aspect ratio (112M parameters)."),
    _v31("DPT_SwinV2_L_384", "dpt_swin2_large_384.pt", "MiDaS v3.1 DPT SwinV2-L 384", 880_189_556, 213_411_869,
         ("dpt_swin2_large_384", "swinv2_large_384"),
         "SwinV2-L encoder; the photo is stretched to 384x384, its only input (213M parameters)."),
    _v31("DPT_SwinV2_B_384", "dpt_swin2_base_384.pt", "MiDaS v3.1 DPT SwinV2-B 384", 436_057_732, 102_378_913,
         ("dpt_swin2_base_384", "swinv2_base_384"),
         "SwinV2-B encoder; the photo is stretched to 384x384, its only input (102M parameters)."),
    _v31("DPT_SwinV2_T_256", "dpt_swin2_tiny_256.pt", "MiDaS v3.1 DPT SwinV2-T 256", 172_048_204, 41_701_331,
         ("dpt_swin2_tiny_256", "swinv2_tiny_256"),
         "SwinV2-T encoder, fast; the photo is stretched to 256x256, its only input (42M parameters)."),
    _v31("DPT_Swin_L_384", "dpt_swin_large_384.pt", "MiDaS v3.1 DPT Swin-L 384", 867_232_628, 213_407_453,
         ("dpt_swin_large_384", "swin_large_384"),
         "Swin-L encoder; the photo is stretched to 384x384, its only input (213M parameters)."),
    _v31("DPT_LeViT_224", "dpt_levit_224.pt", "MiDaS v3.1 DPT LeViT 224", 204_348_452, 50_630_837,
         ("dpt_levit_224", "levit_224"),
         "LeViT-384 encoder, the fastest v3.1 model; the photo is stretched to 224x224 (51M parameters)."),
    _dav2("Small", "vits", "Apache-2.0", 99_140_356, 24_785_089,
          "DINOv2 ViT-S/14 encoder with a DPT head at 518 px, any aspect ratio (24.8M parameters)."),
    _dav2("Base", "vitb", "CC-BY-NC-4.0", 389_883_140, 97_470_785,
          "DINOv2 ViT-B/14 encoder with a DPT head at 518 px (97.5M parameters); non-commercial licence."),
    _dav2("Large", "vitl", "CC-BY-NC-4.0", 1_341_262_596, 335_315_649,
          "DINOv2 ViT-L/14 encoder with a DPT head at 518 px (335M parameters); non-commercial licence."),
)

DEFAULT_MODEL = "MiDaS_small"


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

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every tensor at its dtype: what a checkpoint of this layout holds."""
        total = 0
        for _, shape, dtype in self.entries:
            count = 1
            for dim in shape:
                count *= dim
            total += count * _DTYPE_BYTES.get(dtype, 4)
        return total

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


_DTYPE_BYTES = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "uint8": 1,
                "int8": 1, "bool": 1}


def key_layout_path(architecture: str) -> Path:
    return _HERE / f"keys_{architecture}.json"


# The network variants (one name list, in depthsite.netspecs) whose official key layout ships here: what an
# imported file is identified against. A variant whose net file and layout have not landed is left out.
ARCHITECTURES: tuple[str, ...] = tuple(name for name in NET_NAMES if key_layout_path(name).exists())


@lru_cache(maxsize=None)
def key_layout(architecture: str) -> KeyLayout:
    path = key_layout_path(architecture)
    if architecture not in ARCHITECTURES or not path.exists():
        raise KeyError(f"no official key layout for architecture {architecture!r}")
    data = json.loads(path.read_text())
    entries = tuple((key, tuple(shape), dtype) for key, shape, dtype in data["keys"])
    return KeyLayout(architecture=architecture, entries=entries)


def architecture_entry(architecture: str) -> CatalogueEntry | None:
    """The official release of an architecture (custom entries on it share its size and timings)."""
    for entry in CATALOGUE:
        if entry.architecture == architecture:
            return entry
    return None


def approx_bytes(architecture: str) -> int:
    """About how many bytes the weights of an architecture take, on disk and in memory as float32."""
    entry = architecture_entry(architecture)
    if entry is not None:
        return entry.approx_bytes
    try:
        return key_layout(architecture).tensor_bytes
    except KeyError:
        return 0


@lru_cache(maxsize=1)
def _cpu_times() -> dict:
    try:
        data = json.loads(CPU_TIMES_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_seconds(architecture: str) -> float | None:
    """Median CPU forward time per image at the native size, as `bench/forward.py --write` measured it."""
    models = _cpu_times().get("models")
    entry = models.get(architecture) if isinstance(models, dict) else None
    value = entry.get("median_s") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def cpu_times_machine() -> str:
    """Where `cpu_seconds` was measured, in words."""
    return str(_cpu_times().get("machine", ""))


def family_order(family: str) -> int:
    families = list(FAMILIES)
    return families.index(family) if family in families else len(families)


def license_note(license: str) -> str:
    return LICENSES.get(license, "see the licence of the weights")
