"""The anonymous visitor's upload key, the same for the web pages and the API (a DRF Request passes `.session`
and `.user` through to Django's request).

Jobs and batches store, and are looked up by, a keyed digest of the session key, never the key itself: the key
is the visitor's `sessionid` cookie, and whoever read it in the database or the admin could set that cookie and
be the visitor (their history, their deletes, their quota). The digest is keyed with SECRET_KEY, so a copy of
the table alone cannot be turned back into cookies either; rotating SECRET_KEY (which signs the sessions too)
leaves earlier anonymous jobs without a visitor who can find them.
"""
from __future__ import annotations

from django.utils.crypto import salted_hmac

SALT = "depthsite.upload-session"
DIGEST_LENGTH = 40  # the session_key columns' max_length; a raw Django session key is 32 characters


def session_digest(session_key: str) -> str:
    """The stored form of a session key: 40 hex digits of its HMAC-SHA256 ("" stays "")."""
    if not session_key:
        return ""
    return salted_hmac(SALT, session_key, algorithm="sha256").hexdigest()[:DIGEST_LENGTH]


def upload_session_key(request, *, create: bool = False) -> str:
    """"" for a signed-in user; else the digest of the session key (session_digest), the session created (and
    its cookie sent) when `create` is asked. Every stored or compared DepthJob/DepthBatch.session_key is one."""
    if request.user.is_authenticated:
        return ""
    session = getattr(request, "session", None)
    if session is None:  # a request made up to generate the API schema carries none
        return ""
    if create and not session.session_key:
        session["depthsite_uploads"] = True  # marks the session modified, so its cookie is sent
        session.save()
    return session_digest(session.session_key or "")


def session_keys_digest_stragglers(*, batch: int = 500) -> int:
    """Digest the raw session keys still stored (how many rows changed). Migration 0011 digested the rows before
    it; during a rolling deploy, web processes of the release before it go on storing raw keys until they stop.
    The hourly anonymous expiry calls this, so such a key stays at most an hour, and its visitor finds the job
    again (by its digest) from then on. A raw key is never 40 characters long, a digest always is."""
    from django.db.models.functions import Length

    from inference.models import DepthBatch, DepthJob

    changed = 0
    for model in (DepthJob, DepthBatch):
        raw = (model.objects.annotate(key_length=Length("session_key")).exclude(session_key="")
               .exclude(key_length=DIGEST_LENGTH).only("pk", "session_key").order_by("pk"))
        while True:
            rows = list(raw[:batch])
            if not rows:
                break
            for row in rows:
                row.session_key = session_digest(row.session_key)
            model.objects.bulk_update(rows, ["session_key"])
            changed += len(rows)
    return changed
