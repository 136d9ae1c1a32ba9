"""Batches through the API and the service: several photos or a zip, one job each, hostile archives refused
whole (nothing half-created), limits, quota and rate, permissions, and the zip of the outputs."""
from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from inference.models import DepthBatch, DepthJob
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
BATCH = "/api/predictions/batch"


def make_zip(members: dict[str, bytes] | list[tuple], *, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name, data) members; a ZipInfo may stand for the name to set its flags."""
    buffer = io.BytesIO()
    items = members.items() if isinstance(members, dict) else members
    with zipfile.ZipFile(buffer, "w", compression=compression) as bundle:
        for name, data in items:
            bundle.writestr(name, data)
    return buffer.getvalue()


def archive_upload(data: bytes, name: str = "photos.zip"):
    return upload(data, name, content_type="application/zip")


def post_batch(client, run_jobs, *, photos=(), archive: bytes | None = None, **fields):
    payload = {"images": [upload(data, name) for name, data in photos], "outputs": ["png", "npy"], **fields}
    if archive is not None:
        payload["archive"] = archive_upload(archive)
    with run_jobs():
        return client.post(BATCH, payload, format="multipart")


def stored_uploads() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "uploads"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def assert_nothing_created():
    assert not DepthBatch.objects.exists() and not DepthJob.objects.exists()
    assert stored_uploads() == []


# --- creating ------------------------------------------------------------------------------------


def test_several_images_make_one_job_each_under_one_batch(api, cached_small, run_jobs, user):
    response = post_batch(api, run_jobs, photos=[("a.jpg", images.jpeg()), ("b.png", images.png(64, 48))])
    assert response.status_code == 202, response.content
    body = response.json()
    batch = DepthBatch.objects.get()
    assert body["id"] == str(batch.pk) and batch.owner == user and batch.model_name == "MiDaS_small"
    assert body["url"] == f"http://testserver/api/predictions/batch/{batch.pk}" == response["Location"]
    assert body["page_url"] == f"http://testserver/batch/{batch.pk}/"
    assert body["total"] == 2 and [job["name"] for job in body["jobs"]] == ["a.jpg", "b.png"]
    assert {job.batch_id for job in DepthJob.objects.all()} == {batch.pk}
    status = api.get(body["url"]).json()  # the jobs ran inline once the request's transaction committed
    assert status["complete"] and status["done"] == 2 and status["counts"]["succeeded"] == 2
    assert status["progress"] == 1.0
    assert all(job["status"] == "succeeded" and job["outputs"] == ["npy", "png"] for job in status["jobs"])
    assert status["jobs"][0]["url"].startswith("http://testserver/api/predictions/")


def test_a_zip_of_images_is_unpacked_and_its_junk_skipped_with_reasons(api, cached_small, run_jobs):
    archive = make_zip([("holiday/", b""), ("holiday/beach.jpg", images.jpeg()), ("holiday/dunes.PNG", images.png()),
                        ("__MACOSX/holiday/._beach.jpg", b"\x00\x05\x16\x07"), (".DS_Store", b"junk"),
                        ("notes.txt", b"hello"), ("more.zip", make_zip({"x.jpg": images.jpeg()}))])
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 202, response.content
    body = response.json()
    assert [job["name"] for job in body["jobs"]] == ["beach.jpg", "dunes.PNG"]
    assert body["archive_name"] == "photos.zip"
    reasons = {item["name"]: item["reason"] for item in body["skipped"]}
    assert set(reasons) == {"__MACOSX/holiday/._beach.jpg", ".DS_Store", "notes.txt", "more.zip"}
    assert "nested archives are not opened" in reasons["more.zip"] and "not a photo" in reasons["notes.txt"]
    assert "macOS metadata" in reasons[".DS_Store"]
    assert api.get(body["url"]).json()["counts"]["succeeded"] == 2


def test_images_and_a_zip_together(api, cached_small, run_jobs):
    response = post_batch(api, run_jobs, photos=[("one.jpg", images.jpeg())],
                          archive=make_zip({"two.jpg": images.jpeg(80, 60)}))
    assert response.status_code == 202 and response.json()["total"] == 2


def test_a_bad_option_or_no_photo_is_a_400_naming_it(api, small_model, run_jobs):
    response = post_batch(api, run_jobs, photos=[("a.jpg", images.jpeg())], model="GPT-5")
    assert response.status_code == 400 and response.json()["message"].startswith("model: unknown model 'GPT-5'")
    response = post_batch(api, run_jobs)
    assert response.status_code == 400 and "at least one photo" in response.json()["message"]
    response = post_batch(api, run_jobs, photos=[("a.jpg", images.jpeg())], colour="red")
    assert response.status_code == 400 and "unknown field colour" in response.json()["message"]
    assert_nothing_created()


def test_one_bad_photo_refuses_the_whole_batch_and_leaves_nothing(api, small_model, run_jobs):
    response = post_batch(api, run_jobs, photos=[("good.jpg", images.jpeg()), ("fake.jpg", b"not an image at all")])
    assert response.status_code == 400
    body = response.json()
    assert body["message"].startswith("images: fake.jpg: ") and body["extra"]["file"] == "fake.jpg"
    assert_nothing_created()  # good.jpg was stored first: its upload went with the rolled-back rows


def test_a_bad_photo_inside_the_zip_names_its_member(api, small_model, run_jobs):
    response = post_batch(api, run_jobs, archive=make_zip({"a.jpg": images.jpeg(), "b.png": b"\x89PNG broken"}))
    assert response.status_code == 400 and response.json()["message"].startswith("archive: b.png: ")
    assert_nothing_created()


# --- hostile archives ----------------------------------------------------------------------------


def zip_with_info(info: zipfile.ZipInfo, data: bytes, *extra: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ok.jpg", images.jpeg())
        bundle.writestr(info, data)
        for name, more in extra:
            bundle.writestr(name, more)
    return buffer.getvalue()


@pytest.mark.parametrize("name, problem", [
    ("../../etc/cron.d/evil.jpg", "climbs out of the archive"),
    ("/etc/passwd.jpg", "an absolute name"),
    ("C:/Windows/evil.jpg", "an absolute name"),
    ("..\\..\\evil.jpg", "backslashes"),
    ("photos/../../evil.jpg", "climbs out of the archive"),
])
def test_traversal_and_absolute_names_refuse_the_archive(api, small_model, run_jobs, name, problem):
    response = post_batch(api, run_jobs, archive=zip_with_info(zipfile.ZipInfo(name), images.jpeg()))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["message"].startswith("archive: member ") and problem in body["message"]
    assert body["extra"]["kind"] == "unsafe_name"
    assert_nothing_created()


def test_a_symlink_member_refuses_the_archive(api, small_model, run_jobs):
    link = zipfile.ZipInfo("link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    response = post_batch(api, run_jobs, archive=zip_with_info(link, b"/etc/passwd"))
    assert response.status_code == 400 and "symbolic link" in response.json()["message"]
    assert_nothing_created()


def test_an_encrypted_member_refuses_the_archive(api, small_model, run_jobs):
    # zipfile cannot write encryption: set the "encrypted" flag bit of the last member's local and central headers.
    archive = bytearray(zip_with_info(zipfile.ZipInfo("secret.jpg"), images.jpeg()))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = archive.rfind(signature)
        archive[at + offset] |= 0x1
    response = post_batch(api, run_jobs, archive=bytes(archive))
    assert response.status_code == 400 and "is encrypted" in response.json()["message"]
    assert_nothing_created()


def test_a_name_listed_twice_refuses_the_archive(api, small_model, run_jobs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is told to write
        archive = zip_with_info(zipfile.ZipInfo("twice.jpg"), images.jpeg(), ("twice.jpg", images.jpeg(80, 60)))
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 400 and "listed twice" in response.json()["message"]
    assert_nothing_created()


def test_a_zip_bomb_is_refused_by_its_ratio_before_it_is_unpacked(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 100 * 1000**2
    bomb = make_zip({"bomb.bmp": b"\x00" * (50 * 1000**2)})  # 50 MB of zeros deflate to ~50 KB
    assert len(bomb) < 100_000
    response = post_batch(api, run_jobs, archive=bomb)
    assert response.status_code == 400, response.content
    assert "zip bomb" in response.json()["message"] and response.json()["extra"]["kind"] == "compression_ratio"
    assert_nothing_created()


def test_a_member_that_lies_about_its_size_is_refused(api, small_model, run_jobs):
    archive = bytearray(make_zip({"small.jpg": images.jpeg()}, compression=zipfile.ZIP_STORED))
    # Shrink the size the central directory declares: the unpacked bytes then disagree with it.
    central = archive.rfind(b"PK\x01\x02")
    declared = int.from_bytes(archive[central + 24:central + 28], "little")
    archive[central + 24:central + 28] = (declared // 2).to_bytes(4, "little")
    response = post_batch(api, run_jobs, archive=bytes(archive))
    assert response.status_code == 400, response.content
    assert response.json()["extra"]["kind"] in ("damaged", "size_mismatch")
    assert_nothing_created()


def test_not_a_zip_is_a_400(api, small_model, run_jobs):
    response = post_batch(api, run_jobs, archive=images.jpeg())
    assert response.status_code == 400 and "not a zip file" in response.json()["message"]


def test_an_archive_without_photos_says_what_it_skipped(api, small_model, run_jobs):
    response = post_batch(api, run_jobs, archive=make_zip({"readme.md": b"# hi"}))
    assert response.status_code == 400
    assert "holds no photo" in response.json()["message"] and "readme.md" in response.json()["message"]
    assert_nothing_created()


# --- limits, quota, rate -------------------------------------------------------------------------


def test_too_many_photos_are_refused(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_BATCH_MAX_FILES = 3
    response = post_batch(api, run_jobs, photos=[(f"{n}.jpg", images.jpeg()) for n in range(4)])
    assert response.status_code == 400 and "DEPTHSITE_BATCH_MAX_FILES" in response.json()["message"]
    archive = make_zip({f"{n}.jpg": images.jpeg() for n in range(4)})
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 400 and "4 photos; a batch takes at most 3" in response.json()["message"]
    assert_nothing_created()


def test_too_many_archive_members_are_refused_before_the_directory_is_read(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_BATCH_MAX_FILES = 1  # at most 10 * 1 + 100 members are read
    archive = make_zip({f"junk/{n}.txt": b"" for n in range(111)})
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 400 and response.json()["extra"]["kind"] == "too_many_members"


def test_the_batch_byte_limit_counts_the_body_and_the_unpacked_photos(api, small_model, run_jobs, settings):
    photo = images.jpeg(320, 240)
    settings.DEPTHSITE_BATCH_MAX_BYTES = 2 * len(photo) + 1000
    response = post_batch(api, run_jobs, photos=[(f"{n}.jpg", photo) for n in range(3)])
    assert response.status_code == 413 and "DEPTHSITE_BATCH_MAX_BYTES" in response.json()["message"]
    # A zip whose photos fit packed but not unpacked: stored BMPs deflate well below the limit.
    bmp = images.encode(__import__("PIL.Image", fromlist=["Image"]).fromarray(images.photo_array(200, 150)), "BMP")
    settings.DEPTHSITE_BATCH_MAX_BYTES = 2 * len(bmp)
    archive = make_zip({f"{n}.bmp": bmp for n in range(3)})
    assert len(archive) < settings.DEPTHSITE_BATCH_MAX_BYTES
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 413 and "the batch unpacked is" in response.json()["message"]
    assert_nothing_created()


def test_each_photo_keeps_the_single_upload_limit(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 5000
    response = post_batch(api, run_jobs, archive=make_zip({"big.jpg": images.jpeg(320, 240)}))
    assert response.status_code == 413 and "the limit per photo" in response.json()["message"]
    response = post_batch(api, run_jobs, photos=[("big.jpg", images.jpeg(320, 240))])
    assert response.status_code == 413 and response.json()["message"].startswith("images: big.jpg: ")
    assert_nothing_created()


@pytest.fixture
def anonymous(settings) -> APIClient:
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    return APIClient()


def test_a_batch_counts_against_the_anonymous_quota_like_single_uploads(anonymous, small_model, run_jobs, settings):
    settings.DEPTHSITE_ANON_MAX_JOBS = 3
    photos = [(f"{n}.jpg", images.jpeg()) for n in range(2)]
    assert post_batch(anonymous, run_jobs, photos=photos).status_code == 202
    response = post_batch(anonymous, run_jobs, photos=photos)  # 2 stored + 2 > 3
    assert response.status_code == 429
    assert "this batch of 2 photos would pass the limit of 3" in response.json()["message"]
    assert DepthJob.objects.count() == 2 and DepthBatch.objects.count() == 1
    assert post_batch(anonymous, run_jobs, photos=photos[:1]).status_code == 202  # exactly the last place


def test_a_batch_of_n_counts_as_n_uploads_against_the_rate(api, small_model, run_jobs, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": "4/hour", "writes": "4/hour"}}
    photos = [(f"{n}.jpg", images.jpeg()) for n in range(3)]
    assert post_batch(api, run_jobs, photos=photos).status_code == 202
    assert post_batch(api, run_jobs, photos=photos[:1]).status_code == 202  # the 4th upload of the hour
    assert DepthJob.objects.count() == 4
    response = post_batch(api, run_jobs, photos=photos[:1])
    assert response.status_code == 429 and DepthJob.objects.count() == 4


def test_a_batch_over_the_rate_still_counts_the_request_it_read(api, small_model, run_jobs, settings):
    """The request counts one upload at the door, before its body is read; its other photos once known. A
    batch refused for the rate has still been read, so it costs that one."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": "5/hour", "writes": "5/hour"}}
    photos = [(f"{n}.jpg", images.jpeg()) for n in range(3)]
    assert post_batch(api, run_jobs, photos=photos).status_code == 202
    response = post_batch(api, run_jobs, photos=photos)
    assert response.status_code == 429
    assert "batch of 3 photos would pass your upload rate (1 more now)" in response.json()["message"]
    assert post_batch(api, run_jobs, photos=photos[:1]).status_code == 202
    assert post_batch(api, run_jobs, photos=photos[:1]).status_code == 429
    assert DepthJob.objects.count() == 4


# --- reading, permissions, the outputs' zip ------------------------------------------------------


@pytest.fixture
def finished_batch(api, cached_small, run_jobs) -> dict:
    response = post_batch(api, run_jobs, photos=[("sun set.jpg", images.jpeg()), ("../sun set.jpg", images.jpeg(80, 60)),
                                                 ("moon.png", images.png())])
    assert response.status_code == 202, response.content
    return api.get(response.json()["url"]).json()


def test_other_users_and_anonymous_callers_get_404(finished_batch, other_user, settings):
    other = APIClient()
    other.force_authenticate(other_user)
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    stranger = APIClient()
    for client in (other, stranger):
        for url in (finished_batch["url"], finished_batch["archive_url"]):
            response = client.get(url)
            assert response.status_code == 404 and response.json()["message"].startswith("no batch with id")
    assert APIClient().get(f"{BATCH}/not-a-uuid").status_code == 404


def test_staff_see_anyones_batch(finished_batch, staff):
    admin = APIClient()
    admin.force_authenticate(staff)
    assert admin.get(finished_batch["url"]).json()["total"] == 3


def test_the_archive_holds_every_output_named_after_its_photo_and_a_manifest(api, finished_batch):
    response = api.get(finished_batch["archive_url"])
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response["X-Batch-Complete"] == "true"
    assert f"depth-batch-{finished_batch['id'][:8]}.zip" in response["Content-Disposition"]
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert bundle.testzip() is None
    names = sorted(bundle.namelist())
    assert names == ["manifest.json", "moon-depth.npy", "moon-depth.png", "sun_set-2-depth.npy",
                     "sun_set-2-depth.png", "sun_set-depth.npy", "sun_set-depth.png"]
    manifest = json.loads(bundle.read("manifest.json"))
    assert manifest["complete"] and manifest["batch"] == finished_batch["id"]
    assert [job["files"] for job in manifest["jobs"]][2] == {"npy": "moon-depth.npy", "png": "moon-depth.png"}
    job = DepthJob.objects.get(pk=manifest["jobs"][2]["id"])
    on_disk = (Path(settings.MEDIA_ROOT) / job.result_files["png"]).read_bytes()
    assert bundle.read("moon-depth.png") == on_disk


def test_the_archive_is_409_while_jobs_run_unless_partial(api, small_model, run_jobs, cached_small):
    with run_jobs():
        body = api.post(BATCH, {"images": [upload(), upload(images.png(), "b.png")]}, format="multipart").json()
    DepthJob.objects.filter(image_name="b.png").update(status="running")
    response = api.get(body["archive_url"])
    assert response.status_code == 409 and "still queued or running" in response.json()["message"]
    response = api.get(body["archive_url"] + "?partial=1")
    assert response.status_code == 200 and response["X-Batch-Complete"] == "false"
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(bundle.namelist()) == ["manifest.json", "photo-depth.png"]
    manifest = json.loads(bundle.read("manifest.json"))
    assert [job["status"] for job in manifest["jobs"]] == ["succeeded", "running"] and not manifest["complete"]


def test_the_archive_never_reads_outside_media_root_nor_another_owners_job(api, finished_batch, other_user, tmp_path):
    batch = DepthBatch.objects.get()
    jobs = list(DepthJob.objects.filter(batch=batch).order_by("created_at", "image_name"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"top secret")
    jobs[0].result_files = {**jobs[0].result_files, "png": "../../" * 8 + str(secret).lstrip("/")}
    jobs[0].save()
    DepthJob.objects.filter(pk=jobs[1].pk).update(owner=other_user)  # a row of someone else's pointed at the batch
    response = api.get(f"{BATCH}/{batch.pk}/archive")
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert b"top secret" not in b"".join(bundle.read(name) for name in bundle.namelist())
    manifest = json.loads(bundle.read("manifest.json"))
    assert str(jobs[1].pk) not in {job["id"] for job in manifest["jobs"]}
    assert len(manifest["jobs"]) == 2


def test_the_batch_is_in_the_openapi_schema(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").content.decode()
    assert "/api/predictions/batch" in schema and "/api/predictions/batch/{id}/archive" in schema


def test_expired_anonymous_jobs_take_their_empty_batch_with_them(anonymous, small_model, run_jobs):
    from datetime import timedelta

    from django.utils import timezone

    from inference.tasks import depth_jobs_expire_task

    post_batch(anonymous, run_jobs, photos=[("a.jpg", images.jpeg()), ("b.jpg", images.jpeg())])
    kept = DepthBatch.objects.get()
    post_batch(anonymous, run_jobs, photos=[("c.jpg", images.jpeg())])
    old = DepthBatch.objects.exclude(pk=kept.pk).get()
    long_ago = timezone.now() - timedelta(days=8)
    DepthBatch.objects.filter(pk=old.pk).update(created_at=long_ago)
    DepthJob.objects.filter(batch=old).update(created_at=long_ago)
    with run_jobs():
        assert depth_jobs_expire_task() == f"deleted 1 anonymous job(s), {len(images.jpeg())} bytes, 1 empty batch(es)"
    assert list(DepthBatch.objects.all()) == [kept] and DepthJob.objects.filter(batch=kept).count() == 2


def test_batch_photos_are_spooled_to_disk_never_held_in_memory(api, small_model, run_jobs, monkeypatch):
    from django.core.files.uploadedfile import TemporaryUploadedFile

    from inference.api import views as api_views

    seen = []
    real = api_views.depth_batch_images_collect

    def spy(*, images, archive):
        seen.extend([*images, archive])
        return real(images=images, archive=archive)

    monkeypatch.setattr(api_views, "depth_batch_images_collect", spy)
    post_batch(api, run_jobs, photos=[("a.jpg", images.jpeg())], archive=make_zip({"b.jpg": images.jpeg()}))
    assert len(seen) == 2 and all(isinstance(item, TemporaryUploadedFile) for item in seen)


def test_too_many_file_parts_are_refused_while_the_body_is_read(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_BATCH_MAX_FILES = 3  # 3 photos and one archive at most: the fifth file part stops the parse
    response = post_batch(api, run_jobs, photos=[(f"{n}.jpg", images.jpeg()) for n in range(5)])
    assert response.status_code == 400 and response.json()["extra"]["kind"] == "too_many_files"
    assert "more than 3 files in one batch" in response.json()["message"]
    assert_nothing_created()


def test_anonymous_callers_are_refused_before_the_body_is_read_when_uploads_are_not_public(small_model, run_jobs):
    response = post_batch(APIClient(), run_jobs, photos=[("a.jpg", images.jpeg())])
    assert response.status_code == 401 and response.json()["message"] == "Authentication credentials were not provided."
    assert_nothing_created()
