"""The anonymous visitor's session key, the same for the web pages and the API (a DRF Request passes
`.session` and `.user` through to Django's request)."""
from __future__ import annotations


def upload_session_key(request, *, create: bool = False) -> str:
    """"" for a signed-in user; else the session key, created (and its cookie sent) when `create` is asked."""
    if request.user.is_authenticated:
        return ""
    session = getattr(request, "session", None)
    if session is None:  # a request made up to generate the API schema carries none
        return ""
    if create and not session.session_key:
        session["depthsite_uploads"] = True  # marks the session modified, so its cookie is sent
        session.save()
    return session.session_key or ""
