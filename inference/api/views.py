"""REST doors of predictions: create (multipart, 202), list, read, delete, and result files."""
from __future__ import annotations

import uuid

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from inference.api.permissions import PredictionAccess, UploadThrottle
from inference.api.serializers import PredictionErrorSerializer, PredictionCreateSerializer, PredictionSerializer
from inference.forms import UploadLimitHandler, upload_too_large
from inference.media import media_open
from inference.selectors import depth_job_file, depth_job_get, depth_job_list, depth_job_may_delete
from inference.services.jobs import depth_job_create, depth_job_delete
from inference.writers import OUTPUT_FORMATS
from models_registry.api.throttling import client_address
from models_registry.api.uploads import BodyGate
from models_registry.exceptions import ApplicationError, NotFoundError

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


def _session_key(request) -> str:
    if request.user.is_authenticated:
        return ""
    session = request._request.session
    if not session.session_key:
        session["depthsite_uploads"] = True  # marks it modified, so its cookie is sent
        session.save()
    return session.session_key or ""


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
        return depth_job_list(user=self.request.user, session_key=self._known_session_key(), everyone=True)

    def _known_session_key(self) -> str:
        if self.request.user.is_authenticated:
            return ""
        session = getattr(self.request._request, "session", None)  # absent when the schema is generated
        return (session.session_key if session is not None else "") or ""

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
                                   session_key=_session_key(request), client_address=client_address(request))
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
        if not depth_job_may_delete(job=job, user=request.user, session_key=self._known_session_key()):
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
        return FileResponse(media_open(result.name), content_type=result.content_type, as_attachment=True,
                            filename=result.download_name)

    def perform_content_negotiation(self, request, force=False):
        # Whatever the client accepts, a file is a file and an error is JSON.
        return super().perform_content_negotiation(request, force=True)
