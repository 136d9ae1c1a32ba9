"""Who may use predictions, and how often uploads may come (shared by the API and the web form)."""
from __future__ import annotations

from rest_framework.permissions import BasePermission
from rest_framework.throttling import SimpleRateThrottle

from inference.selectors import uploads_allowed
from models_registry.api.throttling import LiveRatesMixin


class PredictionAccess(BasePermission):
    """Signed-in callers (session or token); anyone while DEPTHSITE_PUBLIC_UPLOADS is on. Which jobs a caller
    sees is decided per job by the selectors (own jobs; staff all; anonymous jobs by their random id)."""

    message = "sign in (session or token) to use predictions"

    def has_permission(self, request, view) -> bool:
        return uploads_allowed(user=request.user)


class UploadThrottle(LiveRatesMixin, SimpleRateThrottle):
    """Anonymous uploads by client address at the "uploads" rate; everything else that writes (signed-in
    uploads, deletions) by user or address at the "writes" rate. Rates are read per request, so a changed
    REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] applies without a restart. Reads are never throttled."""

    scope = "uploads"

    def __init__(self):
        # SimpleRateThrottle binds its rate at construction; ours depends on the request.
        pass

    def _configure(self, request) -> None:
        anonymous = not request.user.is_authenticated
        self.scope = "uploads" if anonymous and request.method == "POST" else "writes"
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)

    def allow_request(self, request, view) -> bool:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        self._configure(request)
        return super().allow_request(request, view)

    def would_allow(self, request, view=None) -> bool:
        """Whether `allow_request` would let this request through, without counting it: the web form asks
        before reading a byte of the body, and counts the upload once its CSRF token has been checked."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        self._configure(request)
        if self.rate is None:
            return True
        self._load_history(request, view)
        return len(self.history) < self.num_requests

    def allow_uploads(self, request, count: int) -> bool:
        """Count a batch of `count` photos as that many uploads: all of them fit in the rate, or none is counted
        (`remaining` then says how many would have)."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        self._configure(request)
        if self.rate is None:
            return True
        self._load_history(request, None)
        self.remaining = max(0, self.num_requests - len(self.history))
        if len(self.history) + count > self.num_requests:
            return False
        self.history[:0] = [self.now] * count
        self.cache.set(self.key, self.history, self.duration)
        return True

    def _load_history(self, request, view) -> None:
        """This caller's recent requests in the window, as SimpleRateThrottle keeps them (nothing counted)."""
        self.key = self.get_cache_key(request, view)
        self.history = self.cache.get(self.key, [])
        self.now = self.timer()
        while self.history and self.history[-1] <= self.now - self.duration:
            self.history.pop()

    def get_cache_key(self, request, view) -> str:
        ident = request.user.pk if request.user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
