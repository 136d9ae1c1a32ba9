"""REST routes of predictions."""
from django.urls import path

from inference.api import views

app_name = "predictions-api"
# `<str:id>`, not `<uuid:id>`: the view answers a malformed id with the API's JSON 404, not Django's HTML page.
urlpatterns = [
    # Batches first, without a trailing slash (as documented): "batch" is never taken for a prediction id.
    path("batch", views.BatchCreateView.as_view(), name="batch-create"),
    path("batch/<str:id>", views.BatchDetailView.as_view(), name="batch-detail"),
    path("batch/<str:id>/archive", views.BatchArchiveView.as_view(), name="batch-archive"),
    path("", views.PredictionListView.as_view(), name="prediction-list"),
    path("<str:id>/", views.PredictionDetailView.as_view(), name="prediction-detail"),
    path("<str:id>/files/<str:fmt>/", views.PredictionFileView.as_view(), name="prediction-file"),
]
