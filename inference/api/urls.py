"""REST routes of predictions."""
app_name = "predictions-api"
urlpatterns: list = []
