"""Weight file formats: recognised by content, read safely, written whole, compared by content digest."""
from models_registry.formats.digest import content_digest, file_sha256
from models_registry.formats.io import read_weights, write_weights
from models_registry.formats.loaded import LoadedWeights
from models_registry.formats.pkl import RestrictedUnpickler, restricted_loads
from models_registry.formats.sniff import BUNDLE, extension_format, sniff_format

__all__ = [
    "BUNDLE",
    "LoadedWeights",
    "RestrictedUnpickler",
    "content_digest",
    "extension_format",
    "file_sha256",
    "read_weights",
    "restricted_loads",
    "sniff_format",
    "write_weights",
]
