"""Web pages of the registry: the cache dashboard."""
from django.urls import path

from models_registry import views

app_name = "models_registry"
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("chart.svg", views.cache_chart, name="chart"),
]
