"""A cached file that fails to load for a reason outside its bytes (too many open files, no memory for the map,
an interrupted or failing read) keeps its health: the caller gets a temporary error (503, "try again"), and
`models optimize` does not delete the only copy. An error about the bytes still marks the file corrupt."""
from __future__ import annotations

import errno
import os

import pytest

from depthsite.exceptions import ApplicationError, OfflineError, WeightFileError
from models_registry import cachefs
from models_registry.choices import Health
from models_registry.services import records
from models_registry.services.cache import cache_optimize_plan
from models_registry.services.resolve import weights_use

pytestmark = [pytest.mark.django_db]

RESOURCE_ERRNOS = [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EIO]


def _failing_once(exc: BaseException):
    calls = {"n": 0}

    def use(weight_file):
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return records.weights_read(weight_file)

    return use, calls


def _wrapped_like_the_formats(cause: BaseException) -> WeightFileError:
    """What a format reader raises for `cause`: a WeightFileError raised `from None` inside the handler."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise WeightFileError(f"midas_v21_small_256.pt: not a loadable PyTorch checkpoint: {inner}",
                                  extra={"kind": "unreadable"}, file="midas_v21_small_256.pt") from None
    except WeightFileError as outer:
        return outer


def _assert_kept(weight_file, error: ApplicationError) -> None:
    assert error.status == 503 and not isinstance(error, OfflineError), (type(error), error)
    assert "try again" in error.message and error.extra.get("kind") == "temporary", error.message
    weight_file.refresh_from_db()
    assert weight_file.health == Health.OK and weight_file.health_reason == ""
    path = cachefs.absolute(weight_file.path)
    assert path.exists()
    assert not [item.description for item in cache_optimize_plan().items
                if item.weight_file_id == weight_file.pk or item.path == weight_file.path]


@pytest.mark.parametrize("code", RESOURCE_ERRNOS, ids=[errno.errorcode[c] for c in RESOURCE_ERRNOS])
def test_a_resource_oserror_keeps_the_file_and_is_temporary(cached_small, small_model, code):
    use, calls = _failing_once(OSError(code, "resource trouble", "/cache/MiDaS_small/midas_v21_small_256.pt"))
    with pytest.raises(ApplicationError) as caught:
        weights_use(model=small_model, use=use, offline=True)
    assert calls["n"] == 1  # reported at once: no other file picked, nothing downloaded
    _assert_kept(cached_small, caught.value)
    assert "/cache/" not in caught.value.message  # the OS's text, not the file's path
    # the next attempt, once the pressure is gone, loads the same file
    weight_file, loaded = weights_use(model=small_model, use=use, offline=True)
    assert weight_file.pk == cached_small.pk and loaded.arrays


@pytest.mark.parametrize("cause", [
    OSError(errno.EMFILE, "Too many open files"),
    RuntimeError("unable to mmap 85000000 bytes from file </c/midas_v21_small_256.pt>: Cannot allocate memory (12)"),
    MemoryError(),
], ids=["oserror", "torch-mmap", "memoryerror"])
def test_a_resource_error_wrapped_by_a_format_reader_is_temporary(cached_small, small_model, cause):
    use, _ = _failing_once(_wrapped_like_the_formats(cause))
    with pytest.raises(ApplicationError) as caught:
        weights_use(model=small_model, use=use, offline=True)
    _assert_kept(cached_small, caught.value)


def test_torch_failing_to_map_a_healthy_file_keeps_it(cached_small, small_model, monkeypatch):
    """End to end through the pt reader: torch's own mmap failure (RuntimeError ... (12))."""
    import torch

    def no_memory(filename, *args, **kwargs):
        raise RuntimeError(f"unable to mmap 85000000 bytes from file <{filename}>: Cannot allocate memory (12)")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", no_memory)
    with pytest.raises(ApplicationError) as caught:
        weights_use(model=small_model, use=records.weights_read, offline=True)
    _assert_kept(cached_small, caught.value)


def test_too_many_open_files_inside_torch_load_keeps_the_file(cached_small, small_model, monkeypatch):
    import torch

    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(torch, "load", emfile)
    with pytest.raises(ApplicationError) as caught:
        weights_use(model=small_model, use=records.weights_read, offline=True)
    _assert_kept(cached_small, caught.value)


def test_no_space_while_using_a_file_is_disk_full_not_corrupt(cached_small, small_model):
    use, _ = _failing_once(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ApplicationError) as caught:
        weights_use(model=small_model, use=use, offline=True)
    assert caught.value.status == 507 and caught.value.extra.get("kind") == "disk_full"
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK


# Guards: what the fix must keep (they pass before it as after).


def test_an_error_about_the_bytes_still_marks_the_file_corrupt(cached_small, small_model):
    use, _ = _failing_once(WeightFileError("midas_v21_small_256.pt: storage 3 extends past the end of the file",
                                           extra={"kind": "truncated"}))
    with pytest.raises(OfflineError):  # the chain went on past it: offline, nothing else to try
        weights_use(model=small_model, use=use, offline=True)
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT and "extends past the end" in cached_small.health_reason


def test_damaged_bytes_read_for_real_still_mark_the_file_corrupt(cached_small, small_model):
    path = cachefs.absolute(cached_small.path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(OfflineError):
        weights_use(model=small_model, use=records.weights_read, offline=True)
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT


def test_a_missing_file_is_not_reported_as_temporary(cached_small, small_model):
    cachefs.absolute(cached_small.path).unlink()
    with pytest.raises(OfflineError):
        weights_use(model=small_model, use=records.weights_read, offline=True)


@pytest.mark.parametrize("where", ["inspect", "functional"])
def test_models_verify_under_a_shortage_keeps_the_file_too(cached_small, small_model, monkeypatch, where):
    """`models verify` is the operator's check, but a shortage while it runs says nothing of the bytes either:
    the same 503, the health left as it was (it once marked the file corrupt, and optimize then deleted it)."""
    from models_registry.services import verify

    shortage = _wrapped_like_the_formats(OSError(errno.EMFILE, "Too many open files"))

    def fail(*args, **kwargs):
        raise shortage

    monkeypatch.setattr(verify, "weights_inspect" if where == "inspect" else "weights_functional_check", fail)
    with pytest.raises(ApplicationError) as refused:
        verify.weight_verify(weight_file=cached_small)
    _assert_kept(cached_small, refused.value)


def test_models_verify_condemns_a_file_that_gives_io_errors(cached_small, small_model, monkeypatch):
    """A job that meets EIO leaves the file alone (one load under pressure); the deliberate check condemns it,
    or a failing sector would be answered "try again" for ever and never replaced."""
    from models_registry.services import verify

    def fail(*args, **kwargs):
        raise _wrapped_like_the_formats(OSError(errno.EIO, "Input/output error"))

    monkeypatch.setattr(verify, "weights_inspect", fail)
    result = verify.weight_verify(weight_file=cached_small)
    assert result.health == Health.CORRUPT and not result.ok
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT


def test_a_shortage_on_one_file_does_not_stop_verifying_the_others(cached_small, small_model, monkeypatch):
    from models_registry.services import verify

    def fail(*args, **kwargs):
        raise _wrapped_like_the_formats(OSError(errno.EMFILE, "Too many open files"))

    monkeypatch.setattr(verify, "weights_inspect", fail)
    [result] = verify.weights_verify(model=small_model)
    assert not result.checked and not result.ok and result.health == Health.OK
    assert "try again" in result.reason and "try again" in result.summary
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK


@pytest.mark.parametrize("code, judged", [(errno.EMFILE, False), (errno.EIO, True)], ids=["EMFILE", "EIO"])
def test_a_raw_os_error_in_the_quick_check_neither_stops_verify_nor_hides(cached_small, small_model, monkeypatch,
                                                                         code, judged):
    """The quick check's sniff opens the file itself: its OSError is judged as the inspection's is."""
    from models_registry.services import verify

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(verify, "_sniffed_format", fail)
    [result] = verify.weights_verify(model=small_model)
    assert result.checked is judged and not result.ok
    assert result.health == (Health.CORRUPT if judged else Health.OK)
    shown = result.as_dict()
    assert shown["checked"] is judged and shown["ok"] is False
    if not judged:
        assert result.summary.startswith("MiDaS_small [pt]: not checked - ")
