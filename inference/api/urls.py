"""REST routes of predictions."""
from django.urls import path

from inference.api import views

app_name = "predictions-api"
# `<str:id>`, not `<uuid:id>`: the view answers a malformed id with the API's JSON 404, not Django's HTML page.
urlpatterns = [
    path("", views.PredictionListView.as_view(), name="prediction-list"),
    path("<str:id>/", views.PredictionDetailView.as_view(), name="prediction-detail"),
    path("<str:id>/files/<str:fmt>/", views.PredictionFileView.as_view(), name="prediction-file"),
]
