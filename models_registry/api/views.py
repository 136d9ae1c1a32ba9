"""REST doors of the registry: each view parses its input, calls one selector or service, and presents the result."""
from __future__ import annotations

import base64
from types import SimpleNamespace

from django.conf import settings
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.exceptions import PermissionDenied
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from depthsite.parsers import JSONParser
from models_registry.api import action_serializers as actions, serializers as s
from models_registry.api.public import cache_info_public, registry_reader_is_public
from models_registry.api.permissions import (
    OPERATOR_PERMISSIONS,
    RUN_ACTIONS,
    CanReadRegistry,
    IsStaff,
    MayOperate,
    may_operate,
    missing_permission_message,
)
from models_registry.api.throttling import SettingsScopedRateThrottle
from models_registry.api.uploads import BodyGate, ImportUploadHandler
from depthsite.exceptions import InvalidRequestError
from models_registry.services.records import node_check
from models_registry.selectors import (
    cache_info,
    download_get,
    model_catalogue,
    model_get,
    model_status,
)

TAG = "models"
NAME_PARAMETER = OpenApiParameter("name", OpenApiTypes.STR, OpenApiParameter.PATH,
                                  description="Model name or alias, case-insensitive (e.g. MiDaS_small, midas-small).")


# A download's transfer errors (502, 507) land on its job row, polled; the POST itself never waits for them.
_ERROR_TEXT = {
    400: "Invalid request (unknown format, missing confirmation, bad field).",
    401: "No credentials: sign in or send `Authorization: Token <key>`.",
    403: "Signed in, but not allowed (writes and exports need a staff user holding the action's model permission).",
    404: "Unknown model, or nothing cached to act on.",
    409: "Collides with the cache's state (a download already running, a changed file, a pinned hash).",
    413: "Upload larger than DEPTHSITE_MAX_IMPORT_BYTES.",
    422: "Not usable weights (unknown or damaged file, wrong layout, unsafe pickle).",
    429: "Too many writes or uploads; retry later.",
    503: "Offline: DEPTHSITE_OFFLINE forbids the network and the weights are not cached.",
    507: "No space left in the cache.",
}
READ_ERRORS = (401, 403)
WRITE_ERRORS = (400, 401, 403, 404, 429)


def errors(*codes: int) -> dict[tuple[int, str], OpenApiResponse]:
    """The documented error responses of an operation, all in the one shape (JSON even where the body is a file)."""
    return {(code, "application/json"): OpenApiResponse(s.ErrorSerializer, description=_ERROR_TEXT[code])
            for code in codes}


class RegistryApi(APIView):
    """Reads: any signed-in user, or anyone when DEPTHSITE_PUBLIC_STATUS is set (who gets the redacted view
    of models_registry.api.public)."""

    # Token first: an anonymous caller gets 401 with `WWW-Authenticate: Token`, which tells a script what to send.
    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [CanReadRegistry]

    def reader_context(self) -> dict:
        return {"request": self.request, "public": registry_reader_is_public(self.request.user)}


class RegistryWriteApi(RegistryApi):
    """Writes: staff holding the permission of the view's `operator_action` (models_registry.api.permissions
    .OPERATOR_PERMISSIONS), rate-limited by the "writes" scope."""

    permission_classes = [MayOperate]
    operator_action = ""  # each write names its own: none is refused
    throttle_classes = [SettingsScopedRateThrottle]
    throttle_scope = "writes"
    parser_classes = [JSONParser, FormParser, MultiPartParser]


def _validated(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


# --- reads ---------------------------------------------------------------------------------------


class ModelListApi(RegistryApi):
    """Every catalogue entry with the files cached on every node, its pinned hash and where it is warm."""

    @extend_schema(tags=[TAG], operation_id="models_list", summary="The catalogue, with cached files and warm loads",
                   responses={200: s.RegisteredModelSerializer(many=True), **errors(*READ_ERRORS)})
    def get(self, request):
        return Response(s.RegisteredModelSerializer(model_catalogue(), many=True, context=self.reader_context()).data)


class ModelDetailApi(RegistryApi):
    """One catalogue entry, by name or alias."""

    @extend_schema(tags=[TAG], operation_id="models_retrieve", summary="One catalogue entry",
                   parameters=[NAME_PARAMETER],
                   responses={200: s.RegisteredModelSerializer, **errors(*READ_ERRORS, 404)})
    def get(self, request, name: str):
        model = model_get(name=name)
        return Response(s.RegisteredModelSerializer(model_catalogue().get(pk=model.pk),
                                                    context=self.reader_context()).data)


class ModelStatusApi(RegistryApi):
    """What the dashboard polls: a node's files per model (this node's unless ?node=X), the latest download,
    and the warm workers."""

    @extend_schema(tags=[TAG], operation_id="models_status",
                   summary="Per model on a node (default this one): cached formats, health, download progress, "
                           "warm workers",
                   parameters=[OpenApiParameter(
                       "node", OpenApiTypes.STR, OpenApiParameter.QUERY, required=False,
                       description="Another node's cache records (read-only, signed-in readers only), as "
                                   "`manage.py models info --node X`; its disk_free is unknown here (null).")],
                   responses={200: s.StatusSerializer, **errors(*READ_ERRORS, 400)})
    def get(self, request):
        node = _validated(s.NodeQuerySerializer, request.query_params).get("node") or None
        if node and registry_reader_is_public(request.user):
            # Node names are the operators' business (anonymous readers see none): no probing them either.
            raise PermissionDenied("sign in to read another node's cache")
        return Response(s.StatusSerializer(model_status(node=node), context=self.reader_context()).data)


class CacheInfoApi(RegistryApi):
    """Totals, format distribution and per-model files on this node (`models info --json`)."""

    @extend_schema(tags=[TAG], operation_id="models_cache_info",
                   summary="Cache statistics, exactly as `manage.py models info --json` prints them",
                   responses={200: s.CacheInfoSerializer, **errors(*READ_ERRORS)})
    def get(self, request):
        info = cache_info()
        return Response(cache_info_public(info) if registry_reader_is_public(request.user) else info)


class DownloadDetailApi(RegistryApi):
    """Poll a download queued by `POST /api/models/{name}/download`."""

    @extend_schema(tags=[TAG], operation_id="models_downloads_retrieve", summary="A download job's progress",
                   responses={200: s.DownloadSerializer, **errors(*READ_ERRORS, 404)})
    def get(self, request, pk: int):
        return Response(s.DownloadSerializer(download_get(pk=pk), context=self.reader_context()).data)


# --- writes --------------------------------------------------------------------------------------


class CacheClearApi(RegistryWriteApi):
    """Staff with models_registry.delete_weightfile. Needs `{"confirm": true}`; files and records go together, under
    each model's lock."""

    operator_action = "cache_clear"

    @extend_schema(tags=[TAG], operation_id="models_cache_clear",
                   summary="Delete cached files and their records (all, one model, or one format)",
                   request=actions.CacheClearRequestSerializer,
                   responses={200: actions.CacheClearResultSerializer, **errors(*WRITE_ERRORS)})
    def post(self, request):
        from models_registry.services.cache import cache_clear

        data = _validated(actions.CacheClearRequestSerializer, request.data)
        if not data["confirm"]:
            raise InvalidRequestError('clearing deletes weight files: send {"confirm": true} to go ahead',
                                  extra={"field": "confirm"})
        model = model_get(name=data["model"]) if data.get("model") else None
        return Response(cache_clear(model=model, fmt=data.get("format"), node=data.get("node")).as_dict())


WAIT_PARAMETER = OpenApiParameter("wait", OpenApiTypes.BOOL, OpenApiParameter.QUERY, required=False,
                                  description="1: run now and answer 200 with the result; otherwise the action is "
                                              "queued and the answer is 202 with a run to poll.")


def _run_or_queue(request, *, kind: str, model, params: dict, sync: bool = False) -> Response:
    """`?wait=1` (or `sync`): run the action in this request and answer 200 with its result. Otherwise queue a
    ManagementRun and answer 202 with it (and its URL in Location), as a download does."""
    from models_registry.services.runs import management_action, management_run_enqueue

    if sync or _validated(actions.WaitQuerySerializer, request.query_params)["wait"]:
        return Response(management_action(kind=kind, model=model, params=params))
    run = management_run_enqueue(kind=kind, model=model, params=params, requested_by=request.user.get_username())
    run.refresh_from_db()  # with Q_CLUSTER sync the task has already run
    body = actions.ManagementRunSerializer(run, context={"request": request}).data
    return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})


def _run_responses(sync_serializer, *codes: int) -> dict:
    return {202: actions.ManagementRunSerializer, 200: sync_serializer, **errors(*WRITE_ERRORS, *codes)}


class CacheOptimizeApi(RegistryWriteApi):
    """Staff with models_registry.delete_weightfile (it deletes files). A plan (dry_run, the default) is answered at
    once; carrying it out is queued (202) unless `?wait=1`."""

    operator_action = "cache_optimize"

    @extend_schema(tags=[TAG], operation_id="models_cache_optimize",
                   summary="Plan (dry_run, the default) or carry out the removal of corrupt, orphan, stale "
                           "and least recently used files",
                   parameters=[WAIT_PARAMETER], request=actions.CacheOptimizeRequestSerializer,
                   responses=_run_responses(actions.OptimizePlanSerializer))
    def post(self, request):
        data = _validated(actions.CacheOptimizeRequestSerializer, request.data)
        node_check(node=data.get("node") or "", action="optimize")
        params = {"dry_run": data["dry_run"], "max_bytes": data.get("max_bytes")}
        return _run_or_queue(request, kind="optimize", model=None, params=params, sync=data["dry_run"])


class ModelDownloadApi(RegistryWriteApi):
    """Staff with models_registry.change_registeredmodel. 202 with a job to poll; 409 while another download of the
    model runs on this node."""

    operator_action = "download"

    @extend_schema(tags=[TAG], operation_id="models_download",
                   summary="Queue a download of the model's weights (from DEPTHSITE_MODEL_MIRROR or the catalogue)",
                   parameters=[NAME_PARAMETER], request=actions.DownloadRequestSerializer,
                   responses={202: s.DownloadSerializer, **errors(*WRITE_ERRORS, 409, 503)})
    def post(self, request, name: str):
        from models_registry.services.download import download_enqueue

        data = _validated(actions.DownloadRequestSerializer, request.data)
        model = model_get(name=name, enabled_only=True)
        node_check(node=data.get("node") or "", action="download", model=model.name, fmt=data.get("format") or "")
        download = download_enqueue(model=model, fmt=data.get("format"), requested_by=request.user.get_username())
        body = s.DownloadSerializer(download, context={"request": request}).data
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})


class ModelVerifyApi(RegistryWriteApi):
    """Staff with models_registry.change_registeredmodel. Records each file's health and reason, as `models verify`
    does; queued (202) unless `?wait=1`."""

    operator_action = "verify"

    @extend_schema(tags=[TAG], operation_id="models_verify",
                   summary="Check the model's cached files on this node (hash, layout, and a tiny forward pass)",
                   parameters=[NAME_PARAMETER, WAIT_PARAMETER], request=actions.VerifyRequestSerializer,
                   responses=_run_responses(actions.VerifyResponseSerializer))
    def post(self, request, name: str):
        data = _validated(actions.VerifyRequestSerializer, request.data)
        model = model_get(name=name)
        node_check(node=data.get("node") or "", action="verify", model=model.name, fmt=data.get("format") or "")
        params = {"format": data.get("format"), "functional": data["functional"]}
        return _run_or_queue(request, kind="verify", model=model, params=params)


class ModelConvertApi(RegistryWriteApi):
    """Staff with models_registry.change_registeredmodel. Same as `models convert --to FORMAT`; queued (202) unless
    `?wait=1`."""

    operator_action = "convert"

    @extend_schema(tags=[TAG], operation_id="models_convert",
                   summary="Add a cached copy in another format (same tensors, proven by the content digest)",
                   parameters=[NAME_PARAMETER, WAIT_PARAMETER], request=actions.ConvertRequestSerializer,
                   responses=_run_responses(s.WeightFileSerializer, 409, 422, 507))
    def post(self, request, name: str):
        data = _validated(actions.ConvertRequestSerializer, request.data)
        return _run_or_queue(request, kind="convert", model=model_get(name=name), params={"format": data["format"]})


_NO_RUN_PERMISSION = (
    "only staff users with the permission of a background run's action may read it ("
    + "; ".join(f"{kind}: {', '.join(OPERATOR_PERMISSIONS[action])}" for kind, action in RUN_ACTIONS.items())
    + "); ask an administrator to grant it")


class ManagementRunDetailApi(RegistryApi):
    """Staff holding the permission of the run's action (RUN_ACTIONS): poll a verify, convert or optimize queued by
    its POST (the result can name files and paths)."""

    permission_classes = [IsStaff]

    @extend_schema(tags=[TAG], operation_id="models_runs_retrieve",
                   summary="A background verify, convert or optimize: status, then result or error",
                   responses={200: actions.ManagementRunSerializer, **errors(*READ_ERRORS, 404)})
    def get(self, request, pk: int):
        from models_registry.selectors import management_run_get
        from models_registry.services.runs import management_run_refresh

        # Refused before the lookup unless the user may read some kind of run: a staff user holding none of their
        # permissions gets the same 403 for a run that exists and one that does not, so ids cannot be probed.
        if not any(may_operate(request.user, action) for action in dict.fromkeys(RUN_ACTIONS.values())):
            raise PermissionDenied(_NO_RUN_PERMISSION)
        run = management_run_get(pk=pk)
        action = RUN_ACTIONS.get(run.kind, "")
        if not may_operate(request.user, action):
            raise PermissionDenied(missing_permission_message(action))
        run = management_run_refresh(run=run)
        return Response(actions.ManagementRunSerializer(run, context={"request": request}).data)


class _WeightFileRenderer(BaseRenderer):
    """Lets a client ask for the file with `Accept: application/octet-stream`; errors still come as JSON text."""

    media_type = "application/octet-stream"
    format = "bin"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return JSONRenderer().render(data, "application/json", renderer_context) if data is not None else b""


class _TarRenderer(_WeightFileRenderer):
    media_type = "application/x-tar"
    format = "tar"


class _WeightFormatNegotiation(DefaultContentNegotiation):
    # `?format=` names a weight format here; DRF would otherwise take it for a renderer and answer 404.
    settings = SimpleNamespace(URL_FORMAT_OVERRIDE=None)


def _digest_headers(sha256: str) -> dict[str, str]:
    encoded = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {
        "ETag": f'"{sha256}"',
        "Digest": f"sha-256={encoded}",  # RFC 3230, what most download tools check
        "Repr-Digest": f"sha-256=:{encoded}:",  # RFC 9530, its successor
    }


class ModelExportApi(RegistryApi):
    """Staff with models_registry.change_weightfile (the admin's export action needs it): it streams whole weight
    files. The cached file itself when it exists in that format."""

    # Not a write, but it streams gigabytes and hands out the weights: the admin's export permission, not a reader's.
    permission_classes = [MayOperate]
    operator_action = "export"
    renderer_classes = [JSONRenderer, _WeightFileRenderer, _TarRenderer]
    content_negotiation_class = _WeightFormatNegotiation

    @extend_schema(tags=[TAG], operation_id="models_export",
                   summary="Stream the model's weights in a format, or a bundle (.tar with a manifest)",
                   parameters=[NAME_PARAMETER, actions.ExportQuerySerializer],
                   responses={(200, "application/octet-stream"): OpenApiResponse(
                       OpenApiTypes.BINARY, description="The file; ETag, Digest and Repr-Digest carry its sha256."),
                       **errors(*READ_ERRORS, 400, 404, 409, 422, 507)})
    def get(self, request, name: str):
        from models_registry.services.export import weight_export_artifact

        query = _validated(actions.ExportQuerySerializer, request.query_params)
        result = weight_export_artifact(model=model_get(name=name), fmt=query["format"], bundle=query["bundle"])
        response = FileResponse(result.open(), as_attachment=True, filename=result.download_name,
                                content_type="application/x-tar" if result.bundle else "application/octet-stream")
        response["Content-Length"] = str(result.size)
        for header, value in _digest_headers(result.sha256).items():
            response[header] = value
        response["X-Content-Digest"] = result.content_digest  # the tensors' digest, equal across formats
        return response


class WeightImportApi(RegistryWriteApi):
    """Staff with models_registry.change_registeredmodel. Multipart field `file` (and optional `model`); the same
    checks as `models import`."""

    parser_classes = [MultiPartParser]
    throttle_scope = "uploads"
    operator_action = "import"

    def initial(self, request, *args, **kwargs):
        # Nothing of the body is read until the caller is known, may import and is within the rate: a session
        # login's CSRF check would otherwise parse (and write) the whole upload first.
        self.upload_handler = ImportUploadHandler(request._request, max_bytes=settings.DEPTHSITE_MAX_IMPORT_BYTES)
        request._request.upload_handlers = [self.upload_handler]
        gate = BodyGate.install(request._request)
        super().initial(request, *args, **kwargs)
        gate.open(request)

    def finalize_response(self, request, response, *args, **kwargs):
        handler = getattr(self, "upload_handler", None)
        if handler is not None:
            handler.cleanup()  # the upload was copied into the cache, or refused: either way it goes
        return super().finalize_response(request, response, *args, **kwargs)

    @extend_schema(tags=[TAG], operation_id="models_import",
                   summary="Upload a weight file or bundle: recognised by content, loaded safely, checked, cached",
                   request={"multipart/form-data": actions.ImportRequestSerializer},
                   responses={201: actions.ImportResultSerializer, 200: actions.ImportResultSerializer,
                              **errors(*WRITE_ERRORS, 409, 413, 422, 507)})
    def post(self, request):
        from models_registry.services.imports import weight_import

        data = _validated(actions.ImportRequestSerializer, request.data)
        upload = data["file"]
        upload.close()
        # The file is saved under a temporary name; the service names it as the caller sent it.
        result = weight_import(path=upload.temporary_file_path(), model_name=data.get("model") or None,
                               original_name=upload.name, imported_by=request.user.get_username(), pin=data["pin"])
        body = result.as_dict()
        body["file"] = s.WeightFileSerializer(result.weight_file).data
        return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)
