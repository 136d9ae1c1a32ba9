"""Records of the registry: catalogue models, the weight files cached for them, and their downloads."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from depthsite.netspecs import NetSpec, net_spec
from models_registry import cachefs
from depthsite.choices import RunStatus
from models_registry.choices import FILE_FORMAT_CHOICES, Health, WeightFormat, architecture_choices


def validate_path_name(value: str) -> None:
    """A model or file name becomes a folder or file of the cache: one plain name, never a path."""
    problem = cachefs.name_problem(value)
    if problem:
        raise ValidationError("%(value)r " + problem.replace("%", "%%"), code="unsafe_name",
                              params={"value": value})


class RegisteredModel(models.Model):
    name = models.CharField(max_length=64, unique=True, validators=[validate_path_name],
                            help_text="Canonical name, e.g. MiDaS_small: letters, digits and . _ - + (it names "
                                      "the model's cache folder).")
    display_name = models.CharField(max_length=128)
    architecture = models.CharField(
        max_length=32, choices=architecture_choices,
        help_text="The network; its native input and preprocessing are facts of the architecture.")
    aliases = models.JSONField(default=list, blank=True, help_text="Other accepted names (case-insensitive).")
    description = models.TextField(blank=True)
    source_url = models.URLField(max_length=500, blank=True)
    file_name = models.CharField(max_length=255, validators=[validate_path_name],
                                 help_text="Name of the released checkpoint file, e.g. midas_v21_small_256.pt "
                                           "(a plain file name, no folders).")
    expected_size = models.BigIntegerField(null=True, blank=True, help_text="Bytes of the released file.")
    expected_sha256 = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the released file; empty until pinned."
    )
    expected_content_digest = models.CharField(
        max_length=64, blank=True, help_text="Content digest of the pinned weights (format-independent)."
    )
    sha256_pinned_at = models.DateTimeField(null=True, blank=True)
    sha256_pinned_from = models.CharField(max_length=500, blank=True)
    license = models.CharField(
        max_length=64, default="MIT",
        help_text="SPDX id of the weights' licence (e.g. MIT, Apache-2.0, CC-BY-NC-4.0); "
                  "DEPTHSITE_ACCEPTED_LICENSES may refuse it.")
    semantics = models.CharField(max_length=128, blank=True)
    enabled = models.BooleanField(default=True)
    pinned = models.BooleanField(default=False, help_text="Pinned models are never evicted by optimize.")
    is_official = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(Lower("name"), name="registeredmodel_name_ci_unique")]

    def __str__(self) -> str:
        return self.name

    @property
    def spec(self) -> NetSpec:
        """The network facts of the architecture (depthsite.netspecs): never stored, so never stale."""
        return net_spec(self.architecture)

    @property
    def input_size(self) -> int | None:
        """The architecture's native input side; None for an architecture this version does not know."""
        try:
            return self.spec.input_size
        except KeyError:
            return None

    @input_size.setter
    def input_size(self, value: int) -> None:
        # Accepted for callers that still state it, but only when it agrees: a size that would be
        # silently ignored is an error.
        if self.architecture and int(value) != self.input_size:
            raise ValueError(f"input_size {value} contradicts architecture {self.architecture} "
                             f"(native input {self.input_size}); it is a fact of the architecture")

    @property
    def preprocessing(self) -> dict:
        try:
            return self.spec.preprocessing
        except KeyError:
            return {}


class WeightFile(models.Model):
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="weight_files")
    # A runtime artifact (onnx) is recorded like weights: its content_digest is that of the weights it was
    # built from, so it is only ever served for those weights.
    format = models.CharField(max_length=16, choices=FILE_FORMAT_CHOICES)
    path = models.CharField(max_length=500, help_text="Relative to the node's cache directory.")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    content_digest = models.CharField(max_length=64, blank=True)
    dtype = models.CharField(max_length=16, blank=True)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.UNVERIFIED)
    health_reason = models.TextField(blank=True)
    functional_hash = models.CharField(
        max_length=64, blank=True, help_text="Hash of the network's output on a fixed tiny input."
    )
    verified_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    node = models.CharField(max_length=255)
    license = models.CharField(max_length=64, blank=True,
                               help_text="Licence of the weights in this file, recorded when it was cached.")
    # Where these bytes came from, as it happened (blank on rows recorded before provenance was kept).
    origin = models.CharField(max_length=16, blank=True,
                              choices=[("download", "downloaded"), ("import", "imported from a file"),
                                       ("convert", "converted from another cached copy"),
                                       ("build", "built for a runtime from a cached copy")])
    origin_source = models.CharField(max_length=500, blank=True,
                                     help_text="The URL downloaded, the imported file's original name, or the "
                                               "copy converted from.")
    origin_by = models.CharField(max_length=150, blank=True,
                                 help_text="Who: a user name, or 'cli' for a management command.")
    # A database default too: the release before it inserts rows without the column during a rolling deploy.
    export_recipe = models.PositiveSmallIntegerField(
        default=0, db_default=0,
        help_text="For a runtime artifact, the version of the export recipe that built it (0: recorded before "
                  "versions were); one of another version than the running release's is rebuilt on next use.")

    class Meta:
        ordering = ["model__name", "format"]
        constraints = [
            models.UniqueConstraint(fields=["model", "format", "node"], name="weightfile_one_per_model_format_node")
        ]
        indexes = [models.Index(fields=["node", "health"])]

    def __str__(self) -> str:
        return f"{self.model.name} [{self.format}] on {self.node}"

    def label(self, health: str | None = None) -> str:
        """ "MiDaS_small [pt]: ok", the one way a file and its health are named in messages."""
        return f"{self.model.name} [{self.format}]: {health or self.health}"

    def set_health(self, health: str, reason: str = "") -> None:
        self.health = health
        self.health_reason = reason
        self.verified_at = timezone.now()

    @property
    def provenance(self) -> dict:
        """Where the file came from, by whom, when, and its sha256: what an export's manifest states."""
        return {"kind": self.origin or "unknown", "source": self.origin_source, "by": self.origin_by,
                "at": self.created_at.isoformat() if self.created_at else None, "sha256": self.sha256}


class BackgroundRun(models.Model):
    """What every background action on a node records: where it runs, who asked, the task, the times, the
    outcome (WeightDownload and ManagementRun add what is their own)."""

    node = models.CharField(max_length=255)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True, help_text="django-q2 task id, for debugging only.")
    requested_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    @property
    def is_active(self) -> bool:
        return self.status in RunStatus.ACTIVE


class WeightDownload(BackgroundRun):
    """One acquisition of a model's weights on a node: progress for the API, outcome for the audit."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="downloads")
    format = models.CharField(max_length=16, choices=WeightFormat.choices, default=WeightFormat.PT)
    source_url = models.CharField(max_length=1000, blank=True)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(null=True, blank=True)
    resumed_from = models.BigIntegerField(default=0)
    error_code = models.CharField(max_length=64, blank=True,
                                  help_text="Stable code of the failure (e.g. download_dns), for scripts and the API.")
    weight_file = models.ForeignKey(WeightFile, null=True, blank=True, on_delete=models.SET_NULL)

    def __str__(self) -> str:
        return f"download of {self.model.name} on {self.node} ({self.status})"

    def start(self, *, source_url: str) -> None:
        self.status = RunStatus.RUNNING
        self.source_url = source_url
        self.started_at = timezone.now()
        self.error = ""
        self.error_code = ""

    def finish(self, weight_file: WeightFile | None) -> None:
        self.status = RunStatus.SUCCEEDED
        self.weight_file = weight_file
        self.finished_at = timezone.now()

    def fail(self, error: str, code: str = "") -> None:
        self.status = RunStatus.FAILED
        self.error = error
        self.error_code = code
        self.finished_at = timezone.now()


class WarmModel(models.Model):
    """A network held loaded in a worker process, so status pages can say where a model is warm."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="warm_loads")
    weight_file = models.ForeignKey(WeightFile, null=True, blank=True, on_delete=models.SET_NULL)
    weights_sha256 = models.CharField(max_length=64, blank=True)
    node = models.CharField(max_length=255)
    worker = models.CharField(max_length=255, help_text="node:pid:start of the process holding it (inference.worker.worker_id).")
    device = models.CharField(max_length=32)
    dtype = models.CharField(max_length=16)
    load_ms = models.FloatField(null=True, blank=True)
    bytes = models.BigIntegerField(null=True, blank=True, help_text="Bytes of the loaded network's tensors.")
    loaded_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["model__name", "worker"]
        constraints = [
            models.UniqueConstraint(fields=["model", "worker", "device", "dtype"], name="warmmodel_unique_per_worker")
        ]

    def __str__(self) -> str:
        return f"{self.model.name} warm in {self.worker} ({self.device}, {self.dtype})"


class ManagementRun(BackgroundRun):
    """A long management action (verify, convert, optimize) run in the background for the API and dashboard:
    the POST answers 202 with this row's URL, a worker runs it, and the row holds the outcome."""

    class Kind(models.TextChoices):
        VERIFY = "verify", "verify"
        CONVERT = "convert", "convert"
        OPTIMIZE = "optimize", "optimize"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    model = models.ForeignKey(RegisteredModel, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="management_runs", help_text="Empty for cache-wide actions (optimize).")
    node = models.CharField(max_length=255, help_text="The node whose cache the action changes.")
    params = models.JSONField(default=dict, blank=True, help_text="The request's validated fields.")
    result = models.JSONField(null=True, blank=True, help_text="What the synchronous call would have answered.")
    error_status = models.PositiveSmallIntegerField(null=True, blank=True,
                                                    help_text="The HTTP status the error would have had.")

    def __str__(self) -> str:
        target = self.model.name if self.model_id else "cache"
        return f"{self.kind} of {target} on {self.node} ({self.status})"

