"""App config: seeds the catalogue after every migrate, idempotently."""
from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _seed_catalogue(sender, **kwargs):
    from models_registry.services.catalogue import catalogue_seed

    catalogue_seed(using=kwargs.get("using", "default"))


class ModelsRegistryConfig(AppConfig):
    name = "models_registry"
    verbose_name = "Model registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        post_migrate.connect(_seed_catalogue, sender=self, dispatch_uid="models_registry.seed_catalogue")
