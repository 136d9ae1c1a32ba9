"""REST doors of predictions: create (multipart, 202), list, read, delete, result files, and batches."""
from __future__ import annotations

import uuid

from django.http import FileResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.reverse import reverse

from inference.api.permissions import PredictionAccess, UploadThrottle
from inference.api.serializers import (
    BatchCreateSerializer,
    BatchSerializer,
    PredictionCreateSerializer,
    PredictionErrorSerializer,
    PredictionSerializer,
)
from inference.forms import UploadLimitHandler, batch_upload_handlers_install, upload_too_large
from inference.selectors import (
    depth_batch_get,
    depth_batch_jobs,
    depth_batch_summary,
    depth_job_file,
    depth_job_get,
    depth_job_is_another_users,
    depth_job_list,
    depth_job_may_delete,
)
from inference.services.batch_images import depth_batch_images_collect
from inference.services.batch_zip import depth_batch_archive_plan, depth_batch_archive_stream
from inference.services.batches import depth_batch_create
from inference.media import media_open_served
from inference.sessions import upload_session_key
from inference.services.jobs import depth_job_create, depth_job_delete
from inference.writers import OUTPUT_FORMATS
from models_registry.api.permissions import missing_permission_message
from models_registry.api.throttling import client_address
from models_registry.api.uploads import BodyGate
from depthsite.exceptions import ApplicationError, ConflictError, NotFoundError

ERRORS = {
    400: OpenApiResponse(PredictionErrorSerializer, description="A field is wrong; the message names it."),
    401: OpenApiResponse(PredictionErrorSerializer, description="Not signed in."),
    403: OpenApiResponse(PredictionErrorSerializer, description="Not signed in, or CSRF token missing."),
    404: OpenApiResponse(PredictionErrorSerializer, description="No such prediction (or not yours)."),
    413: OpenApiResponse(PredictionErrorSerializer, description="Too many bytes or pixels."),
    429: OpenApiResponse(PredictionErrorSerializer,
                         description="Too many uploads (retry later), or the anonymous quota of jobs or bytes is used up."),
}
ID_PARAMETER = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The prediction's id.")


def _naming_field(exc: ApplicationError) -> ApplicationError:
    # API messages name the field they are about, as DRF's validation messages do.
    field = exc.extra.get("field")
    if field and not exc.message.startswith(f"{field}:"):
        exc.message = f"{field}: {exc.message}"
    return exc


class PredictionAPIView(GenericAPIView):
    permission_classes = [PredictionAccess]
    serializer_class = PredictionSerializer
    lookup_url_kwarg = "id"

    def get_queryset(self):
        return depth_job_list(user=self.request.user, session_key=upload_session_key(self.request), everyone=True)

    def get_object(self):
        try:
            job_id = uuid.UUID(str(self.kwargs["id"]))
        except ValueError:
            raise NotFoundError(f"no prediction with id {self.kwargs['id']!r}: ids are UUIDs",
                                extra={"id": str(self.kwargs["id"])}) from None
        return depth_job_get(job_id=job_id, user=self.request.user)


class PredictionListView(PredictionAPIView):
    parser_classes = [MultiPartParser, FormParser]
    throttle_classes = [UploadThrottle]

    def initial(self, request, *args, **kwargs):
        # The body is read only once the caller is authenticated, allowed and within the rate (a session
        # login's CSRF check would otherwise parse it first); the size limit applies from the first byte.
        gate = None
        if request.method == "POST":
            self.upload_limit = UploadLimitHandler(request._request, drain=False)
            request._request.upload_handlers.insert(0, self.upload_limit)
            gate = BodyGate.install(request._request)
        super().initial(request, *args, **kwargs)
        if gate is not None:
            gate.open(request)

    @extend_schema(
        summary="The caller's predictions",
        description="Newest first, paginated. Signed-in users see their own (staff see all); an anonymous "
                    "caller (DEPTHSITE_PUBLIC_UPLOADS) sees those of its session cookie.",
        responses={200: PredictionSerializer(many=True), 401: ERRORS[401], 403: ERRORS[403], 404: ERRORS[404]},
    )
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        serializer = self.get_serializer(page, many=True)
        return self.get_paginated_response(serializer.data)

    @extend_schema(
        summary="Estimate the depth of a photo",
        description="Stores the photo and queues a job; poll the returned `url` until `status` is succeeded "
                    "or failed, then download `files`.",
        request={"multipart/form-data": PredictionCreateSerializer},
        responses={202: PredictionSerializer, **{code: ERRORS[code] for code in (400, 401, 403, 413, 429)}},
    )
    def post(self, request):
        serializer = PredictionCreateSerializer(data=request.data)
        if getattr(self, "upload_limit", None) is not None and self.upload_limit.exceeded:
            raise upload_too_large(name_field=True)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            job = depth_job_create(image=data["image"], model=data["model"], outputs=data["outputs"],
                                   colormap=data["colormap"], fov=data["fov"], owner=request.user,
                                   session_key=upload_session_key(request, create=True), client_address=client_address(request))
        except ApplicationError as exc:
            raise _naming_field(exc) from None
        body = PredictionSerializer(job, context={"request": request}).data
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})


class PredictionDetailView(PredictionAPIView):
    throttle_classes = [UploadThrottle]

    @extend_schema(summary="A prediction: status, timings, result URLs, depth range and semantics",
                   parameters=[ID_PARAMETER],
                   responses={200: PredictionSerializer, 401: ERRORS[401], 403: ERRORS[403], 404: ERRORS[404]})
    def get(self, request, id):
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(summary="Delete a prediction and its files", parameters=[ID_PARAMETER],
                   responses={204: None, **{code: ERRORS[code] for code in (401, 403, 404, 429)}})
    def delete(self, request, id):
        job = self.get_object()
        if not depth_job_may_delete(job=job, user=request.user, session_key=upload_session_key(self.request)):
            if depth_job_is_another_users(job=job, user=request.user):
                # Seen through the view permission of jobs, deleted only with the delete permission.
                raise PermissionDenied(missing_permission_message("jobs_delete_others"))
            raise NotFoundError(f"no prediction with id {id} that you may delete", extra={"id": str(id)})
        depth_job_delete(job=job)
        return Response(status=status.HTTP_204_NO_CONTENT)


class PredictionFileView(PredictionAPIView):
    @extend_schema(
        summary="Download one output of a finished prediction",
        parameters=[ID_PARAMETER, OpenApiParameter("fmt", str, OpenApiParameter.PATH, enum=list(OUTPUT_FORMATS),
                                                   description="The output format.")],
        responses={(200, "image/png"): OpenApiTypes.BINARY, (200, "application/octet-stream"): OpenApiTypes.BINARY,
                   401: ERRORS[401], 403: ERRORS[403], 404: ERRORS[404]},
    )
    def get(self, request, id, fmt):
        result = depth_job_file(job=self.get_object(), fmt=fmt)
        # Streamed from the media storage after the owner check (get_object): no public or presigned URL.
        return FileResponse(media_open_served(result.name), content_type=result.content_type, as_attachment=True,
                            filename=result.download_name)

    def perform_content_negotiation(self, request, force=False):
        # Whatever the client accepts, a file is a file and an error is JSON.
        return super().perform_content_negotiation(request, force=True)


# --- batches -------------------------------------------------------------------------------------

BATCH_ID_PARAMETER = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The batch's id.")


def batch_body(batch, summary: dict, request) -> dict:
    """A batch summary with the API's and the web's URLs (absolute, as the predictions API gives them)."""
    jobs = [{**item, "url": reverse("predictions-api:prediction-detail", args=[item["id"]], request=request)}
            for item in summary["jobs"]]
    return {**summary, "jobs": jobs,
            "url": reverse("predictions-api:batch-detail", args=[batch.pk], request=request),
            "page_url": reverse("inference:batch_detail", args=[batch.pk], request=request),
            "archive_url": reverse("predictions-api:batch-archive", args=[batch.pk], request=request)}


class BatchAPIView(GenericAPIView):
    permission_classes = [PredictionAccess]
    serializer_class = BatchSerializer

    def get_object(self):
        try:
            batch_id = uuid.UUID(str(self.kwargs["id"]))
        except ValueError:
            raise NotFoundError(f"no batch with id {self.kwargs['id']!r}: ids are UUIDs",
                                extra={"id": str(self.kwargs["id"])}) from None
        return depth_batch_get(batch_id=batch_id, user=self.request.user)


class BatchCreateView(BatchAPIView):
    parser_classes = [MultiPartParser, FormParser]
    throttle_classes = [UploadThrottle]

    def initial(self, request, *args, **kwargs):
        # As for a single prediction: nothing of the body is read before the caller is known, allowed and
        # within its rate, and the batch's byte and file limits apply from the first byte.
        self.upload_limit = batch_upload_handlers_install(request._request, drain=False)
        gate = BodyGate.install(request._request)
        super().initial(request, *args, **kwargs)
        gate.open(request)

    def check_throttles(self, request):
        # The request counts one upload before its body is read, whatever becomes of it: a refused archive or an
        # oversized body costs the server its reading too. The other N-1 photos of a batch count once known
        # (see post).
        throttle = UploadThrottle()
        if not throttle.allow_request(request, self):
            self.throttled(request, throttle.wait())

    @extend_schema(
        summary="Estimate the depth of several photos (a batch)",
        description="Several `images` parts and/or one `archive` zip, with the options of a single prediction. "
                    "Every photo becomes a prediction under one batch; if any photo or the archive is refused, "
                    "nothing is created. A batch of N photos counts as N uploads against the upload rate and the "
                    "anonymous quota. Poll `url` until `complete`, then fetch `archive_url`.",
        request={"multipart/form-data": BatchCreateSerializer},
        responses={202: BatchSerializer, **{code: ERRORS[code] for code in (400, 401, 403, 413, 429)}},
    )
    def post(self, request):
        serializer = BatchCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            with depth_batch_images_collect(images=data["images"], archive=data["archive"]) as photos:
                throttle = UploadThrottle()
                if not throttle.allow_uploads(request, len(photos) - 1):  # the first counted at the door
                    raise _batch_throttled(len(photos), throttle)
                batch = depth_batch_create(images=photos, model=data["model"], outputs=data["outputs"],
                                           colormap=data["colormap"], fov=data["fov"], owner=request.user,
                                           session_key=upload_session_key(request, create=True), client_address=client_address(request))
        except ApplicationError as exc:
            raise _naming_field(exc) from None
        body = batch_body(batch, depth_batch_summary(batch=batch, jobs=depth_batch_jobs(batch=batch)), request)
        return Response(BatchSerializer(body).data, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})


def _batch_throttled(count: int, throttle: UploadThrottle) -> ApplicationError:
    from inference.exceptions import QuotaExceededError

    wait = throttle.wait()
    return QuotaExceededError(
        f"this batch of {count} photos would pass your upload rate ({throttle.remaining} more now); send fewer, or "
        "try again" + (f" in {int(wait) + 1} s" if wait else " later"),
        extra={"kind": "throttled", "count": count, "remaining": throttle.remaining, "wait": wait})


class BatchDetailView(BatchAPIView):
    @extend_schema(summary="A batch: progress, counts per status, and each prediction's state",
                   parameters=[BATCH_ID_PARAMETER],
                   responses={200: BatchSerializer, 401: ERRORS[401], 403: ERRORS[403], 404: ERRORS[404]})
    def get(self, request, id):
        batch = self.get_object()
        body = batch_body(batch, depth_batch_summary(batch=batch, jobs=depth_batch_jobs(batch=batch)), request)
        return Response(BatchSerializer(body).data)


class BatchArchiveView(BatchAPIView):
    @extend_schema(
        summary="Every output of a batch as one zip",
        description="Each finished prediction's outputs, named `<photo>-depth<suffix>` (made safe and unique), and "
                    "`manifest.json` listing every prediction with its status, error and files. While predictions "
                    "are queued or running: 409, unless `partial=1` asks for what is finished so far (the manifest "
                    "then says `complete: false`, as does the X-Batch-Complete header).",
        parameters=[BATCH_ID_PARAMETER,
                    OpenApiParameter("partial", OpenApiTypes.BOOL, OpenApiParameter.QUERY,
                                     description="1: answer with the finished outputs while others still run.")],
        responses={(200, "application/zip"): OpenApiTypes.BINARY, 401: ERRORS[401], 403: ERRORS[403],
                   404: ERRORS[404],
                   409: OpenApiResponse(PredictionErrorSerializer, description="Predictions still running.")},
    )
    def get(self, request, id):
        batch = self.get_object()
        entries, manifest = depth_batch_archive_plan(batch=batch, jobs=depth_batch_jobs(batch=batch))
        if not manifest["complete"] and request.query_params.get("partial") not in ("1", "true"):
            running = sum(1 for job in manifest["jobs"] if job["status"] in ("queued", "running"))
            raise ConflictError(f"{running} prediction(s) of this batch are still queued or running; poll the batch "
                                "until `complete`, or ask for the finished ones with ?partial=1",
                                extra={"running": running, "total": len(manifest["jobs"])})
        response = StreamingHttpResponse(depth_batch_archive_stream(entries=entries, manifest=manifest),
                                         content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="depth-batch-{batch.short_id}.zip"'
        response["X-Batch-Complete"] = "true" if manifest["complete"] else "false"
        return response

    def perform_content_negotiation(self, request, force=False):
        return super().perform_content_negotiation(request, force=True)
