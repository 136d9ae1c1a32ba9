"""Read a weight file safely, check its key layout, identify its model, and run the registered functional check."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from depthsite.exceptions import InvalidRequestError, WeightFileError
from models_registry.catalogue import ARCHITECTURES, key_layout
from models_registry.formats import LoadedWeights, content_digest, file_sha256, read_weights
from models_registry.models import RegisteredModel

# A functional check builds the architecture, loads the tensors strictly, runs a fixed tiny input and
# returns a hash of the output. The inference app registers one; the registry never imports inference. The
# caller passes the tensors' content digest it already computed (the check may key a memo on it).
FunctionalCheck = Callable[..., str]  # (model, arrays, *, digest: str | None) -> output hash
_functional_checks: list[FunctionalCheck] = []


def functional_check_register(check: FunctionalCheck) -> None:
    if check not in _functional_checks:
        _functional_checks.append(check)


@dataclass
class Inspection:
    path: Path
    format: str
    size: int
    sha256: str
    loaded: LoadedWeights
    digest: str

    @property
    def dtype(self) -> str:
        return self.loaded.dtype


def _describe_mismatch(architecture: str, mismatch: dict[str, list]) -> str:
    parts = []
    if mismatch["missing"]:
        parts.append(f"{len(mismatch['missing'])} missing ({', '.join(mismatch['missing'][:3])}"
                     f"{', ...' if len(mismatch['missing']) > 3 else ''})")
    if mismatch["unexpected"]:
        parts.append(f"{len(mismatch['unexpected'])} unexpected ({', '.join(mismatch['unexpected'][:3])}"
                     f"{', ...' if len(mismatch['unexpected']) > 3 else ''})")
    if mismatch["wrong_shape"]:
        key, expected, found = mismatch["wrong_shape"][0]
        parts.append(f"{len(mismatch['wrong_shape'])} with the wrong shape ({key}: expected {expected}, found {found})")
    return f"keys do not match the official {architecture} layout: " + "; ".join(parts)


def weights_inspect(*, path: Path, architecture: str | None = None, fmt: str | None = None) -> Inspection:
    """Sniff, hash, load safely and digest a weight file; check its layout when the architecture is known."""
    path = Path(path)
    loaded = read_weights(path, fmt, architecture=architecture)
    if architecture:
        mismatch = key_layout(architecture).mismatches(loaded.shapes)
        if any(mismatch.values()):
            raise WeightFileError(_describe_mismatch(architecture, mismatch),
                                  extra={"kind": "layout_mismatch", **{k: v[:20] for k, v in mismatch.items()}})
    digest = content_digest(loaded.arrays)
    declared = loaded.metadata.get("content_digest")
    if declared and declared != digest:
        raise WeightFileError(
            f"{path.name} declares content digest {declared[:16]}... but its tensors hash to {digest[:16]}...: "
            "the file was altered after it was written",
            extra={"kind": "digest_mismatch"}, file=path.name,
        )
    return Inspection(path=path, format=loaded.format, size=path.stat().st_size, sha256=file_sha256(path),
                      loaded=loaded, digest=digest)


def architecture_identify(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return [arch for arch in ARCHITECTURES if key_layout(arch).matches(shapes)]


def model_identify(*, inspection: Inspection) -> RegisteredModel:
    """The registered model whose official key layout the weights have; refuses when none or several match."""
    pinned = list(RegisteredModel.objects.filter(expected_content_digest=inspection.digest, enabled=True))
    if len(pinned) == 1:
        return pinned[0]
    architectures = architecture_identify(inspection.loaded.shapes)
    if not architectures:
        raise WeightFileError(
            f"{inspection.path.name} does not have the key layout of any known MiDaS architecture "
            f"({', '.join(ARCHITECTURES)}); naming the model it is meant for shows what differs",
            extra={"kind": "unknown_layout"}, file=inspection.path.name,
        )
    candidates = list(RegisteredModel.objects.filter(architecture__in=architectures, enabled=True))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightFileError(f"the weights have the {architectures[0]} layout but no enabled model uses it",
                              extra={"kind": "unknown_layout"})
    names = ", ".join(model.name for model in candidates)
    raise InvalidRequestError(f"the weights fit several models ({names}); say which one they are for",
                          extra={"field": "model", "kind": "ambiguous_model",
                                 "candidates": [model.name for model in candidates]})


def weights_functional_check(model: RegisteredModel, loaded: LoadedWeights, *, digest: str | None = None) -> str:
    result = ""
    for check in _functional_checks:
        try:
            result = check(model, loaded.arrays, digest=digest)
        except WeightFileError:
            raise
        except Exception as exc:  # a network that cannot run these weights is a corrupt file, not a crash
            raise WeightFileError(f"the network failed to run these weights: {type(exc).__name__}: {exc}",
                                  extra={"kind": "functional"}) from exc
    return result
