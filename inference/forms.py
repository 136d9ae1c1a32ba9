"""The upload form of the web page, and the upload handler that stops reading a photo past the size limit."""
from __future__ import annotations

from django import forms
from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, TemporaryFileUploadHandler

from depthsite.units import format_size
from inference.colormaps import COLORMAPS, DEFAULT_COLORMAP
from inference.images import ALPHA_NOTE
from inference.selectors import output_choices
from inference.writers import DEFAULT_FOV_DEGREES
from depthsite.exceptions import TooLargeError, InvalidRequestError

# Room for the multipart envelope (boundaries, part headers, the small fields) around a file at the limit.
ENVELOPE_BYTES = 64 * 1024
# A web form reads on past its limit (dropping the file's bytes) to show itself again with the user's choices; it
# does so for a body of up to this many times its limit (a phone's full-size photo where the limit is small).
# A larger body is refused unread by depthsite.middleware_limits: what one request makes the server read stays
# bounded, and the upload rate counts it (a failed CSRF check at a form included).
FORM_DRAIN_FACTOR = 4


def upload_too_large(size: int | None = None, *, name_field: bool = False, whole_body: bool = False) -> TooLargeError:
    """The 413 of an upload over DEPTHSITE_MAX_UPLOAD_BYTES; API messages name their field, form errors sit under it.

    `whole_body`: the size is the request's Content-Length (the file plus a small envelope), known before reading."""
    limit = settings.DEPTHSITE_MAX_UPLOAD_BYTES
    said = (f"the file is {'about ' if whole_body else ''}{format_size(size)}" if size
            else "the file is too large")
    message = f"{said}; the limit is {format_size(limit)} (DEPTHSITE_MAX_UPLOAD_BYTES)"
    return TooLargeError(f"image: {message}" if name_field else message[:1].upper() + message[1:],
                         extra={"field": "image", "kind": "too_many_bytes", "limit": limit, "size": size})


class UploadLimitHandler(FileUploadHandler):
    """Refuses a body or file over DEPTHSITE_MAX_UPLOAD_BYTES before it reaches a temporary file.

    `drain=False` (the API) answers at once from Content-Length; `drain=True` (the web form) reads the rest,
    dropping the file's bytes but parsing the other fields, because a browser shows no response to a request
    whose body it could not finish, and the form is shown again with the user's choices kept.
    Either way `exceeded` tells the door to answer 413, and `file_size` says how big the refused file was.
    A body whose Content-Length is over the limit plus ENVELOPE_BYTES (the API's), or over FORM_DRAIN_FACTOR
    times the limit plus ENVELOPE_BYTES (a web form's), never gets here: the request body limit middleware
    (depthsite/middleware_limits.py) refuses it unread, so what a form drains is bounded.
    """

    limit_setting = "DEPTHSITE_MAX_UPLOAD_BYTES"

    def __init__(self, request=None, *, drain: bool):
        super().__init__(request)
        self.drain = drain
        self.exceeded = False
        self.limit = getattr(settings, self.limit_setting)
        self.file_size: int | None = None
        self.body_size: int | None = None

    def too_large(self, size: int | None, *, whole_body: bool = False) -> TooLargeError:
        return upload_too_large(size, name_field=True, whole_body=whole_body)

    def unread_refusal(self, length: int) -> TooLargeError | None:
        """This door's answer to a body of `length` bytes before any of it is read (depthsite.middleware_limits):
        the API's past the limit and the envelope; a form's only past FORM_DRAIN_FACTOR times the limit, since up
        to there it reads on to show itself again with the size next to the file."""
        allowance = (FORM_DRAIN_FACTOR if self.drain else 1) * self.limit + ENVELOPE_BYTES
        if not self.limit or length <= allowance:
            return None
        self.exceeded, self.body_size = True, length
        return self.refusal() if self.drain else self.too_large(length, whole_body=True)

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if self.limit and content_length and content_length > self.limit + ENVELOPE_BYTES:
            self.exceeded = True
            self.body_size = content_length
            if not self.drain:
                raise self.too_large(content_length, whole_body=True)
        return None

    def receive_data_chunk(self, raw_data, start):
        if self.exceeded or (self.limit and start + len(raw_data) > self.limit):
            self.exceeded = True
            if not self.drain:
                raise upload_too_large(start + len(raw_data), name_field=True)
            # Dropped here, so no later handler writes it; the parser goes on to the fields after the file.
            return None
        return raw_data

    def file_complete(self, file_size):
        if self.exceeded:
            self.file_size = max(self.file_size or 0, file_size)  # the parser counts what it gave this handler
        return None

    def refusal(self) -> TooLargeError:
        if self.file_size:
            return upload_too_large(self.file_size)
        return upload_too_large(self.body_size, whole_body=True)


class DepthJobForm(forms.Form):
    # A plain FileField: the service decodes the photo itself and says precisely what is wrong with it.
    image = forms.FileField(label="Photo", allow_empty_file=True,
                            widget=forms.ClearableFileInput(attrs={
                                "accept": "image/jpeg,image/png,image/webp,image/gif,image/bmp,image/tiff"}),
                            help_text=f"JPEG, PNG, WebP, GIF (first frame), BMP or TIFF. {ALPHA_NOTE}")
    model = forms.ChoiceField(label="Model", widget=forms.RadioSelect)
    colormap = forms.ChoiceField(label="Colour map", choices=[(name, name) for name in COLORMAPS],
                                 initial=DEFAULT_COLORMAP)
    outputs = forms.MultipleChoiceField(label="Outputs", choices=output_choices(), initial=["png"],
                                        widget=forms.CheckboxSelectMultiple)
    # Bounds are checked by the service (one message for the form and the API); blank means the default.
    fov = forms.FloatField(label="Field of view (degrees, for the 3D point cloud)", required=False,
                           initial=DEFAULT_FOV_DEGREES)

    def __init__(self, *args, model_names: list[str], default_model: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(name, name) for name in model_names]
        self.fields["model"].initial = default_model if default_model in model_names else (model_names or [""])[0]


def batch_too_large(size: int | None = None, *, whole_body: bool = False) -> TooLargeError:
    """The 413 of a batch request over DEPTHSITE_BATCH_MAX_BYTES (all its photos, or its zip, together)."""
    limit = settings.DEPTHSITE_BATCH_MAX_BYTES
    said = (f"the batch is {'about ' if whole_body else 'over '}{format_size(size)}" if size
            else "the batch is too large")
    return TooLargeError(f"{said}; a batch takes at most {format_size(limit)} in all (DEPTHSITE_BATCH_MAX_BYTES)",
                         extra={"field": "images", "kind": "too_many_bytes", "limit": limit, "size": size})


def batch_too_many_files(count: int) -> InvalidRequestError:
    limit = settings.DEPTHSITE_BATCH_MAX_FILES
    return InvalidRequestError(f"more than {limit} files in one batch (DEPTHSITE_BATCH_MAX_FILES); send fewer, or "
                           "several batches", extra={"field": "images", "kind": "too_many_files", "limit": limit,
                                                     "count": count})


class BatchUploadLimitHandler(UploadLimitHandler):
    """UploadLimitHandler for a batch: DEPTHSITE_BATCH_MAX_BYTES over the whole body and every file together,
    and at most DEPTHSITE_BATCH_MAX_FILES photos plus one archive. `drain` as for single uploads."""

    limit_setting = "DEPTHSITE_BATCH_MAX_BYTES"

    def __init__(self, request=None, *, drain: bool):
        super().__init__(request, drain=drain)
        self.too_many_files = False
        self.max_files = settings.DEPTHSITE_BATCH_MAX_FILES + 1
        self.received = 0
        self.files = 0

    def too_large(self, size: int | None, *, whole_body: bool = False) -> TooLargeError:
        return batch_too_large(size, whole_body=whole_body)

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.files += 1
        if self.files > self.max_files:
            self.too_many_files = True
            if not self.drain:
                raise batch_too_many_files(self.files)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.limit and self.received > self.limit:
            self.exceeded = True
        if self.exceeded or self.too_many_files:
            if not self.drain:
                raise self.refusal()
            return None  # dropped: no later handler writes it; the parser goes on to the fields after it
        return raw_data

    def file_complete(self, file_size):
        return None

    def refusal(self):
        if self.too_many_files:
            return batch_too_many_files(self.files)
        return batch_too_large(self.body_size or self.received, whole_body=self.body_size is not None)


def batch_upload_handlers_install(request, *, drain: bool) -> BatchUploadLimitHandler:
    """A batch's upload handlers on Django's request: the limits first, then temporary files only. Django keeps
    files under FILE_UPLOAD_MAX_MEMORY_SIZE in memory, which for 50 photos is most of the batch in memory."""
    limit = BatchUploadLimitHandler(request, drain=drain)
    request.upload_handlers = [limit, TemporaryFileUploadHandler(request)]
    return limit


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files in one field (`<input type=file multiple>`); each is checked by the batch service."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, (list, tuple)):
            return [single(item, initial) for item in data if item]
        return [single(data, initial)] if data else []


class DepthBatchForm(DepthJobForm):
    """The batch upload: several photos and/or one zip of photos, with the options of a single upload."""

    image = None
    images = MultipleFileField(
        label="Photos", required=False, allow_empty_file=True,
        widget=MultipleFileInput(attrs={"accept": "image/jpeg,image/png,image/webp,image/gif,image/bmp,image/tiff"}),
        help_text=f"Several JPEG, PNG, WebP, GIF, BMP or TIFF files. {ALPHA_NOTE}")
    archive = forms.FileField(label="Or a zip of photos", required=False, allow_empty_file=True,
                              widget=forms.ClearableFileInput(attrs={"accept": ".zip,application/zip"}))

    field_order = ["images", "archive", "model", "colormap", "outputs", "fov"]
