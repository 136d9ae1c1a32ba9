"""App config: registers the functional health check and the runtime artifact builder with the registry (the registry never imports us)."""
from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Depth inference"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from inference import checks  # noqa: F401  (registers the system checks)

        from inference.health import weights_functional_hash
        from models_registry.services.inspection import functional_check_register

        functional_check_register(weights_functional_hash)

        from models_registry.services.runtime import runtime_builder_register

        runtime_builder_register(_runtime_artifact_build)

        from inference import signals  # noqa: F401  (connects the depth job receivers)

        from django.conf import settings

        if getattr(settings, "DEPTHSITE_COUNT_QUERIES_DIR", None):  # bench/scale.py only
            from depthsite.querycount import queries_count_install

            queries_count_install(folder=settings.DEPTHSITE_COUNT_QUERIES_DIR)


def _runtime_artifact_build(*, model, offline=None):
    # Imported on use: commands that never build an artifact (models info) do not pay for the module.
    from inference.runtime.artifacts import runtime_artifact_build
    from models_registry.services.resolve import weights_use

    # The registry's one "try the next file" loop: a source file that does not load is marked corrupt.
    return weights_use(model=model, use=lambda weight_file: runtime_artifact_build(model=model,
                                                                                   weight_file=weight_file),
                       offline=offline)[1]
