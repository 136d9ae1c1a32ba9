"""DepthJob.session_key and DepthBatch.session_key held the anonymous uploader's own session key, which is their
`sessionid` cookie: whoever read it (in the admin, in a copy of the database) could be that visitor. They now
hold a keyed digest of it (inference.sessions.session_digest); this rewrites the rows written before.

A raw Django session key is 32 characters of [a-z0-9]; a digest is exactly 40 hex digits, so rows already
holding one (written by this release, or by an earlier run of this migration) are left as they are. The digest
cannot be turned back into the key: going back leaves the digests, and the release before this one then finds
no anonymous visitor's jobs by their session (they keep their address quota; signed-in users see no change).
"""
from django.db import migrations
from django.db.models.functions import Length
from django.utils.crypto import salted_hmac

# inference.sessions as this migration was written: a later change of the digest must not change what ran here.
SALT = "depthsite.upload-session"
DIGEST_LENGTH = 40
BATCH = 500


def digest(session_key: str) -> str:
    return salted_hmac(SALT, session_key, algorithm="sha256").hexdigest()[:DIGEST_LENGTH]


def _rewrite(model, alias: str) -> int:
    """Rewrite the raw keys of one model's rows, BATCH rows at a time in primary-key order (no cursor stays open
    across the writes, which SQLite does not isolate from it)."""
    manager = model.objects.using(alias)
    raw = (manager.annotate(key_length=Length("session_key")).exclude(session_key="")
           .exclude(key_length=DIGEST_LENGTH).only("pk", "session_key").order_by("pk"))
    changed, last = 0, None
    while True:
        chunk = list((raw if last is None else raw.filter(pk__gt=last))[:BATCH])
        if not chunk:
            return changed
        for row in chunk:
            row.session_key = digest(row.session_key)
        manager.bulk_update(chunk, ["session_key"])
        changed, last = changed + len(chunk), chunk[-1].pk


def session_keys_to_digests(apps, schema_editor):
    alias = schema_editor.connection.alias
    for name in ("DepthJob", "DepthBatch"):
        _rewrite(apps.get_model("inference", name), alias)


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0010_depthjob_dtype_drop_task_id"),
    ]

    operations = [
        migrations.RunPython(session_keys_to_digests, migrations.RunPython.noop, elidable=True),
    ]
