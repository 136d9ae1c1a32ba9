"""The catalogue in the database: idempotent seeding of the official models, and hash pinning."""
from __future__ import annotations

import logging
import re

from django.db import transaction
from django.utils import timezone

from models_registry.catalogue import CATALOGUE
from depthsite.exceptions import InvalidRequestError
from models_registry.models import RegisteredModel

logger = logging.getLogger(__name__)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def catalogue_seed(*, using: str = "default") -> list[RegisteredModel]:
    """Create or refresh the official entries; operators' choices (enabled, pinned, pinned hash) are kept."""
    seeded = []
    with transaction.atomic(using=using):
        for entry in CATALOGUE:
            defaults = {
                "display_name": entry.display_name,
                "architecture": entry.architecture,
                "aliases": list(entry.aliases),
                "description": entry.description,
                "source_url": entry.source_url,
                "file_name": entry.file_name,
                "license": entry.license,
                "semantics": entry.semantics,
                "is_official": True,
            }
            model, created = RegisteredModel.objects.using(using).get_or_create(name=entry.name, defaults=defaults)
            if not created:
                changed = [field for field, value in defaults.items() if getattr(model, field) != value]
                for field in changed:
                    setattr(model, field, defaults[field])
                if changed:
                    model.save(using=using, update_fields=[*changed, "updated_at"])
            if entry.expected_sha256 and not model.expected_sha256:
                model.expected_sha256 = entry.expected_sha256
                model.expected_size = entry.expected_size
                model.save(using=using, update_fields=["expected_sha256", "expected_size", "updated_at"])
            seeded.append(model)
    return seeded


def model_pin(
    *,
    model: RegisteredModel,
    sha256: str = "",
    size: int | None = None,
    content_digest: str = "",
    source: str = "",
    reset: bool = False,
) -> RegisteredModel:
    """Pin the expected sha256 of a model's released file (trust on first use, or an operator's hash).

    reset=True forgets the pin, so the next good download pins again. When the pin changes, a cached
    copy stays usable only if its weights are proven to be the newly pinned file's (a pt copy with that
    sha256, or a copy whose content digest equals the digest of such a file); every other copy is
    marked unusable with the reason, so the pinned file is fetched again instead of the old weights
    being served.
    """
    previous = (model.expected_sha256, model.expected_content_digest)
    if reset:
        model.expected_sha256 = ""
        model.expected_size = None
        model.expected_content_digest = ""
        model.sha256_pinned_at = None
        model.sha256_pinned_from = ""
    else:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.match(sha256):
            raise InvalidRequestError(f"not a sha256 hash: {sha256!r} (64 hex digits)", extra={"field": "sha256"})
        if model.expected_sha256 != sha256:
            model.expected_content_digest = ""
        model.expected_sha256 = sha256
        model.expected_size = size
        if content_digest:
            model.expected_content_digest = content_digest
        elif not model.expected_content_digest:
            model.expected_content_digest = _pinned_file_digest(model, sha256)
        model.sha256_pinned_at = timezone.now()
        model.sha256_pinned_from = source or "operator"
    with transaction.atomic():
        model.save()
        if (model.expected_sha256, model.expected_content_digest) != previous:
            _unproven_copies_mark(model, reset=reset)
    logger.info("%s pin of %s: %s", "reset" if reset else "set", model.name, model.expected_sha256 or "-")
    return model


def _pinned_file_digest(model: RegisteredModel, sha256: str) -> str:
    """The content digest of a recorded pt file (on any node) that is the pinned file itself, or ''."""
    from models_registry.models import WeightFile

    digests = (WeightFile.objects.filter(model=model, format="pt", sha256=sha256).exclude(content_digest="")
               .values_list("content_digest", flat=True).distinct())
    found = list(digests[:2])
    return found[0] if len(found) == 1 else ""


def _unproven_copies_mark(model: RegisteredModel, *, reset: bool) -> int:
    """Mark every usable cached copy (all nodes) that the new pin does not prove; how many were marked."""
    from models_registry.choices import Health
    from models_registry.models import WeightFile
    from models_registry.services.records import weight_pin_problem

    marked = 0
    for weight_file in WeightFile.objects.filter(model=model, health__in=Health.USABLE):
        if reset:
            problem = "was cached under a pin that was reset; the next download pins and caches the file again"
        else:
            problem = weight_pin_problem(model=model, weight_file=weight_file)
        if problem:
            weight_file.set_health(Health.CORRUPT, f"not served since the pin of {model.name} changed: {problem}")
            weight_file.save(update_fields=["health", "health_reason", "verified_at"])
            marked += 1
    if marked:
        logger.warning("pin of %s changed: %d cached cop%s no longer served", model.name, marked,
                       "y is" if marked == 1 else "ies are")
    return marked
