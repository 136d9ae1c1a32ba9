"""Web pages of depth estimation: upload, job pages, history."""
app_name = "inference"
urlpatterns: list = []
