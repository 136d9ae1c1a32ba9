"""Staff accounts for tests that exercise operator actions: is_staff alone no longer lets anyone clear, convert,
export or import (models_registry.api.permissions.OPERATOR_PERMISSIONS names what each needs)."""
from __future__ import annotations


def grant_operator_permissions(user, *, prefix: str = "models_registry."):
    """Gives `user` every permission the operator table names under `prefix` (by default: every registry action,
    what a cache operator holds), and returns it."""
    from django.contrib.auth.models import Permission

    from models_registry.api.permissions import OPERATOR_PERMISSIONS

    for name in sorted({perm for perms in OPERATOR_PERMISSIONS.values() for perm in perms if perm.startswith(prefix)}):
        app_label, codename = name.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    # Django caches a user's permissions on the instance: a fresh read sees the grant.
    for cache in ("_perm_cache", "_user_perm_cache", "_group_perm_cache"):
        user.__dict__.pop(cache, None)
    return user
