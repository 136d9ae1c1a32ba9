"""Web pages of the registry: the cache dashboard."""
app_name = "models_registry"
urlpatterns: list = []
