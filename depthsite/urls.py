"""URL map: the web pages, the REST API with its schema, and the admin."""
from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
]
