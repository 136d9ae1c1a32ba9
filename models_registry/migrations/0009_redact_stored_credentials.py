"""Rows written before downloads stored their sources in shown form may hold a mirror's user:password (the pin's
source, the download row's URL and error), and every signed-in user can read them through the API. Rewrite them
as fetch.shown_url shows a URL: scheme, host, port and path; in an error, every URL it quotes. Rows whose fields
carry no userinfo or query are left as they are."""
import re
from urllib.parse import urlsplit

from django.db import migrations
from django.db.models import Q

# scheme://user:password@  (userinfo ends at the last "@" before the host, as urlsplit and urllib3 read it: a raw
# "@" may sit in the password; the authority ends at "/", "?", "#" or a space)
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
# A URL quoted in a stored error: up to the next space, quote or closing bracket.
QUOTED_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


def shown(url: str) -> str:
    """A stored URL without userinfo, query or fragment (fetch.shown_url's form, kept here as the migration ran)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # not a URL urlsplit can take apart: strip the userinfo alone
        return USERINFO.sub(r"\g<scheme>", url)
    return f"{parts.scheme}://{host}{parts.path}"


def redact(apps, schema_editor):
    RegisteredModel = apps.get_model("models_registry", "RegisteredModel")
    WeightFile = apps.get_model("models_registry", "WeightFile")
    WeightDownload = apps.get_model("models_registry", "WeightDownload")
    pinned = Q(sha256_pinned_from__contains="@") | Q(sha256_pinned_from__contains="?")
    for model in RegisteredModel.objects.filter(pinned):
        clean = shown(model.sha256_pinned_from)
        if clean != model.sha256_pinned_from:
            RegisteredModel.objects.filter(pk=model.pk).update(sha256_pinned_from=clean)
    sourced = Q(origin_source__contains="@") | Q(origin_source__contains="?")
    for weight_file in WeightFile.objects.filter(sourced):
        clean = shown(weight_file.origin_source)
        if clean != weight_file.origin_source:
            WeightFile.objects.filter(pk=weight_file.pk).update(origin_source=clean)
    for download in WeightDownload.objects.filter(Q(source_url__contains="@") | Q(source_url__contains="?")
                                                  | Q(error__contains="://")):
        clean_url = shown(download.source_url)
        # Userinfo first over the whole text (a password may hold quotes or brackets, which end a quoted URL),
        # then each quoted URL in shown form (its query).
        clean_error = QUOTED_URL.sub(lambda quoted: shown(quoted.group(0)), USERINFO.sub(r"\g<scheme>", download.error))
        if (clean_url, clean_error) != (download.source_url, download.error):
            WeightDownload.objects.filter(pk=download.pk).update(source_url=clean_url, error=clean_error)


class Migration(migrations.Migration):

    dependencies = [
        ("models_registry", "0008_weightfile_export_recipe"),
    ]

    operations = [
        migrations.RunPython(redact, migrations.RunPython.noop, elidable=True),
    ]
