"""REST routes of the model registry."""
app_name = "models-api"
urlpatterns: list = []
