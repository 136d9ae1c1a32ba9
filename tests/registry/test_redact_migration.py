"""Migration 0009: rows written before sources were stored in shown form lose the mirror's user:password."""
from __future__ import annotations

import importlib

import pytest
from django.apps import apps

from models_registry.models import RegisteredModel, WeightDownload

migration = importlib.import_module("models_registry.migrations.0009_redact_stored_credentials")
MIRROR = "https://alice:s3cret@mirror.example:8443/weights/dpt_large_384.pt?token=abc"


@pytest.mark.parametrize("stored, shown", [
    (MIRROR, "https://mirror.example:8443/weights/dpt_large_384.pt"),
    ("http://[::1]:9000/w.pt", "http://[::1]:9000/w.pt"),
    ("https://github.com/isl-org/MiDaS/releases/download/v3/dpt_large_384.pt",
     "https://github.com/isl-org/MiDaS/releases/download/v3/dpt_large_384.pt"),
    ("the catalogue", "the catalogue"),
    ("http://bob:pw@host:notaport/x", "http://host:notaport/x"),
])
def test_a_stored_url_keeps_scheme_host_port_and_path_only(stored, shown):
    assert migration.shown(stored) == shown


@pytest.mark.django_db
def test_pins_and_download_rows_written_before_are_rewritten_without_the_password():
    model = RegisteredModel.objects.create(name="Redacted", architecture="DPT_Large", sha256_pinned_from=MIRROR)
    failed = WeightDownload.objects.create(model=model, node="n", source_url=MIRROR, status="failed",
                                           error=f"{MIRROR} answered 404 Not Found: the file is not there")
    untouched = WeightDownload.objects.create(model=model, node="n", source_url="https://h.example/w.pt",
                                              error="no space left on device")
    migration.redact(apps, None)
    model.refresh_from_db()
    failed.refresh_from_db()
    untouched.refresh_from_db()
    assert "s3cret" not in model.sha256_pinned_from and "s3cret" not in failed.source_url
    assert "s3cret" not in failed.error and "alice" not in failed.error and "token=abc" not in failed.error
    assert failed.error.startswith("https://mirror.example:8443/weights/dpt_large_384.pt")
    assert (untouched.source_url, untouched.error) == ("https://h.example/w.pt", "no space left on device")


@pytest.mark.django_db
@pytest.mark.parametrize("password", ["pa(ss", "p'w", 'p"w', "p<w>", "p@s(s", "a@b'c"])
def test_a_password_of_quotes_or_brackets_is_taken_out_of_stored_errors(password):
    model = RegisteredModel.objects.create(name="Quoted", architecture="DPT_Large")
    url = f"https://al:{password}@mirror.example/w.pt"
    row = WeightDownload.objects.create(model=model, node="n", source_url=url, status="failed",
                                        error=f"{url}?token=a'b answered 404 Not Found")
    migration.redact(apps, None)
    row.refresh_from_db()
    assert password not in row.error and password not in row.source_url and "token" not in row.error

