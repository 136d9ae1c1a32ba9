"""Web pages of depth estimation: upload, job pages, history, batches."""
from django.urls import path

from inference import batch_views, views

app_name = "inference"
urlpatterns = [
    path("", views.upload, name="upload"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/<uuid:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<uuid:job_id>/status.json", views.job_status, name="job_status"),
    path("jobs/<uuid:job_id>/input", views.job_input, name="job_input"),
    path("jobs/<uuid:job_id>/files/<str:fmt>", views.job_file, name="job_file"),
    path("jobs/<uuid:job_id>/delete", views.job_delete, name="job_delete"),
    path("jobs/<uuid:job_id>/run-again", views.job_run_again, name="job_run_again"),
    path("batch/", batch_views.batch_upload, name="batch_upload"),
    path("batch/<uuid:batch_id>/", batch_views.batch_detail, name="batch_detail"),
    path("batch/<uuid:batch_id>/status.json", batch_views.batch_status, name="batch_status"),
    path("batch/<uuid:batch_id>/archive.zip", batch_views.batch_archive, name="batch_archive"),
]
