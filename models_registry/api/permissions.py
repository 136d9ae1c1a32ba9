"""Who may call the registry API: reads for signed-in users (or anyone with DEPTHSITE_PUBLIC_STATUS), writes for staff."""
from __future__ import annotations

from django.conf import settings
from rest_framework.permissions import BasePermission, IsAdminUser


class CanReadRegistry(BasePermission):
    """The catalogue, status and cache statistics: any signed-in user, or anyone when the status is public."""

    message = "sign in (session or token) to read the model registry"

    def has_permission(self, request, view) -> bool:
        # Read per request, not at import: an operator's override (and a test's) applies without a restart.
        if settings.DEPTHSITE_PUBLIC_STATUS:
            return True
        return bool(request.user and request.user.is_authenticated)


class IsStaff(IsAdminUser):
    """Every change to the cache, and exports (they stream whole weight files): staff users only."""

    message = "only staff users may change the model cache or export weights"
