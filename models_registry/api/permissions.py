"""Who may call the registry API: reads for signed-in users (or anyone with DEPTHSITE_PUBLIC_STATUS); each write,
and the other operator actions of the site, for staff holding the Django model permission the table below names."""
from __future__ import annotations

from django.conf import settings
from rest_framework.permissions import BasePermission, IsAdminUser

# Every operator action of the site (REST API, web pages, dashboard buttons) and the Django model permissions it
# needs, all of them, on top of is_staff (superusers hold every permission). The registry's admin actions ask this
# table by its keys (models_registry.admin.OperatorActionPermissions); inference/admin.py's declare the same model
# permissions (`permissions=[...]`):
# "delete" for what deletes files or jobs, "change" for what writes files or records, runs a job again or hands out
# a weight file, "view" to read other users' jobs. The registry's strings name `inference` permissions as plain text:
# the registry never imports inference (tests/test_layering.py). A user's own jobs need none of these.
OPERATOR_PERMISSIONS: dict[str, tuple[str, ...]] = {
    # The model cache. Clearing and optimizing delete weight files and their records (admin: clear_files).
    "cache_clear": ("models_registry.delete_weightfile",),
    "cache_optimize": ("models_registry.delete_weightfile",),
    # Writing a model's cached files or its record (admin: convert_to_*, verify_models); a download or an import
    # adds files as a conversion does, and an import may pin the model's hash.
    "download": ("models_registry.change_registeredmodel",),
    "import": ("models_registry.change_registeredmodel",),
    "verify": ("models_registry.change_registeredmodel",),
    "convert": ("models_registry.change_registeredmodel",),
    # Streaming a whole weight file out (admin: export_file).
    "export": ("models_registry.change_weightfile",),
    # Other users' depth jobs and batches: list and read them (photos, results, archives), delete them (admin:
    # delete_selected), run them again (admin: rerun_jobs).
    "jobs_view_others": ("inference.view_depthjob",),
    "jobs_delete_others": ("inference.view_depthjob", "inference.delete_depthjob"),
    "jobs_run_again_others": ("inference.view_depthjob", "inference.change_depthjob"),
    "batches_view_others": ("inference.view_depthbatch", "inference.view_depthjob"),
}

# A background run (models_registry.models.ManagementRun, by its kind) is read with the permission of the action that
# queued it: its result names files and paths, and ids are sequential.
RUN_ACTIONS: dict[str, str] = {"verify": "verify", "convert": "convert", "optimize": "cache_optimize"}

NOT_STAFF = "only staff users may change the model cache or export weights"


def may_operate(user, action: str) -> bool:
    """Whether `user` may carry out operator `action` (a key of OPERATOR_PERMISSIONS): an active staff user holding
    every permission it names. An unknown action is refused."""
    permissions = OPERATOR_PERMISSIONS.get(action)
    if permissions is None or user is None or not user.is_authenticated:
        return False
    return bool(user.is_active and user.is_staff and user.has_perms(permissions))


def missing_permission_message(action: str) -> str:
    permissions = OPERATOR_PERMISSIONS.get(action)
    if not permissions:  # may_operate refuses it to everyone: no permission to ask for
        return "this action is not open to staff accounts"
    return (f"only staff users with the {', '.join(permissions)} permission may do this "
            f"({action.replace('_', ' ')}); ask an administrator to grant it")


class CanReadRegistry(BasePermission):
    """The catalogue, status and cache statistics: any signed-in user, or anyone when the status is public."""

    message = "sign in (session or token) to read the model registry"

    def has_permission(self, request, view) -> bool:
        # Read per request, not at import: an operator's override (and a test's) applies without a restart.
        if settings.DEPTHSITE_PUBLIC_STATUS:
            return True
        return bool(request.user and request.user.is_authenticated)


class IsStaff(IsAdminUser):
    """Reads only staff may make (a background run's result names files and paths): staff users only."""

    message = NOT_STAFF


class MayOperate(BasePermission):
    """Staff holding the permissions OPERATOR_PERMISSIONS names for the view's `operator_action`; a view that names
    none is refused. DRF makes one instance per request, so the message may say what was missing."""

    message = NOT_STAFF

    def has_permission(self, request, view) -> bool:
        action = getattr(view, "operator_action", "")
        if may_operate(request.user, action):
            return True
        user = request.user
        if user and user.is_authenticated and user.is_staff:
            self.message = missing_permission_message(action)
        return False
