"""A failed job's error is read by whoever holds the job's id (status.json, the API, a batch's summary and its
archive's manifest), anonymous uploaders included. Workers now store a fixed sentence for every error not written
for the uploader (inference.services.job_runs.error_for); jobs that failed before kept the error's own text, which
may name a cache path, quote a mirror's URL with its password, a setting, an OSError or a build's output. This
rewrites those to the sentence of their code (the code itself is kept, for API clients that branch on it).

The rule: a failed job's error is rewritten when
- its code is `download_failed`, `weights` or `offline` and it is not one of the sentences workers store for that
  code today (FIXED, OFFLINE_KEPT): every older text of these codes was the exception's own (a mirror's host and
  port, a cache path, the last error of a cached file), and nothing else is written for them now;
- it holds server detail (SERVER_DETAIL): "://", "DEPTHSITE_", "Traceback", "[Errno N]", a path (absolute, "~/",
  "./", a Windows drive, a UNC share, "file:", or a relative one: word/word/..., word/name.ext), a host's port
  (host:8443, [fd00::5]:8443);
- or it is a device error of an older release ("unknown device ...", "device ... was asked for but ...", "device
  type ..."): the device sentence (ERROR_DEVICE), which names neither the setting's value nor the hardware;
- or its code is `model` and it is not the model-gone wording (MODEL_GONE) nor one of the sentences: every other
  model error came from the registry or the configuration (no download URL, a licence refused);
- or its code is `internal` and it is none of what is written for uploaders (KEPT_INTERNAL): the generic
  sentences and an image the network could not be given ("cannot prepare the image for <model>: <one line of
  plain words>"); every other internal error was an exception's own text (a conflict, a build, a device).
Every other error (a timeout, an interruption, an unreadable image, out of memory, all in words written for the
uploader) is left as it is, and so is every sentence below: running this again changes nothing. Going back leaves
the sentences (the logs of the workers that failed the jobs keep the text).
"""
import re

from django.db import migrations

# inference.services.job_runs as this migration was written: a later change of the wording must not change what
# ran here.
ERROR_GENERIC = ("an internal error stopped this job (the details are in the worker's log); "
                 "re-running it may help, otherwise tell the site's administrator")
ERROR_CONFIGURATION = "the server cannot fetch this model; ask the operator"
ERROR_LICENSE = "this site does not accept the licence of this model's weights; submit the photo again with another model"
ERROR_DEVICE = "the server cannot run models on the device it is configured for; ask the operator"
ERROR_DOWNLOAD_CHECK = ("the model's downloaded weights did not pass their check; an administrator can see why on "
                        "the models page and retry the download")
SENTENCES = {
    "download_failed": ("the model's weights could not be downloaded; an administrator can see why on the models "
                        "page and retry the download"),
    "weights": "the model's cached weights are unusable; an administrator must check them (manage.py models verify)",
    "image": "the uploaded image cannot be read: the image is damaged and cannot be decoded",
    "out_of_memory": "out of memory while processing this image; try a smaller image or a smaller model",
}
KEPT_INTERNAL = re.compile(
    r"an internal error stopped this job \(the details are in the worker's log\); .*"
    r"|the server could not run this job \(error internal: \w+\); .*"
    r"|the server is out of disk space for this model; .*"
    r"|the server cannot run models on the device it is configured for; ask the operator"
    # A preprocessing ValueError about the uploader's image: one line of plain words (no slash, backslash, bracket,
    # double quote, "@" or "%": a path, a URL or a build's output is rewritten).
    r"|cannot prepare the image for [\w.+-]+: [\w .,;:()'=*+-]*",
    re.DOTALL,
)
# The only texts these codes get today (error_for); any other was an older release's raw exception text.
FIXED = {
    "download_failed": (SENTENCES["download_failed"], ERROR_DOWNLOAD_CHECK),
    "weights": (SENTENCES["weights"],),
}
OFFLINE_KEPT = re.compile(r"(?:the model|[\w.+-]+) is not cached on this node and the site is offline, so it cannot "
                          r"be downloaded; submit the photo again with another model, or ask the operator to import it")
# DEPTHSITE_DEVICE (or a worker's --device) that the machine could not run, in an older release's words.
DEVICE = re.compile(r"unknown device |device \S+ was asked for but |device type \S+ is not supported")
MODEL_GONE = re.compile(r"the model \S+ (no longer exists in the registry|was disabled after this job was submitted); "
                        r"submit the photo again with another model")
SERVER_DETAIL = re.compile(
    r"://|DEPTHSITE_|Traceback|\[Errno \d+\]"
    r"|(?:^|[\s'\"(\[=:,])(?:~|\.\.?)?/[\w.~-]"  # /var/cache/..., '/srv/...', ~/models, path=/tmp/x, ./w.pt
    r"|\b[A-Za-z]:[\\/]"  # C:\\..., C:/...
    r"|\\\\[^\\\s]+\\"  # \\srv\share (a UNC share)
    r"|\b(?i:file):(?=\S)"  # file:relative/w.pt, file:w.pt
    r"|\w[\w.+-]*/[\w.+-]+/[\w.+-]"  # var/cache/x (one slash between words, "and/or", is no path)
    r"|\w[\w.+-]*/[\w+-]+\.[A-Za-z]\w*"  # uploads/x.jpg, models/w.pt
    r"|\b[A-Za-z0-9][\w.-]*:\d{2,5}\b"  # mirror.internal:8443, 10.0.0.5:8443 (not cuda:1)
    r"|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%\w+)?\]"  # [fd00::5], [::1]:8443, [fe80::1%eth0]
)
BATCH = 500


def offline_sentence(model_name: str) -> str:
    return (f"{model_name or 'the model'} is not cached on this node and the site is offline, so it cannot be "
            "downloaded; submit the photo again with another model, or ask the operator to import it")


def _model_sentence(error: str) -> str:
    return ERROR_LICENSE if "licen" in error.lower() else ERROR_CONFIGURATION


def redacted(error: str, code: str, model_name: str) -> str:
    """The error a failed job keeps: `error` itself, or the sentence of its code (see the rule above)."""
    if code == "offline":
        sentence = offline_sentence(model_name)
    elif code == "model":
        sentence = _model_sentence(error)
    elif code in ("internal", "") and DEVICE.match(error):
        sentence = ERROR_DEVICE
    else:
        sentence = SENTENCES.get(code, ERROR_GENERIC)
    if error in (sentence, ERROR_GENERIC, ERROR_CONFIGURATION, ERROR_LICENSE):
        return error
    if code in FIXED:
        return error if error in FIXED[code] else sentence
    if code == "offline":
        return error if OFFLINE_KEPT.fullmatch(error) else sentence
    if sentence == ERROR_DEVICE or SERVER_DETAIL.search(error):
        return sentence
    if code == "model" and not MODEL_GONE.fullmatch(error):
        return sentence
    if code == "internal" and not KEPT_INTERNAL.fullmatch(error):
        return sentence
    return error


def job_errors_redact(apps, schema_editor):
    """Rewrite the failed jobs' errors, BATCH rows at a time in primary-key order (no cursor stays open across the
    writes, which SQLite does not isolate from it)."""
    DepthJob = apps.get_model("inference", "DepthJob")
    failed = (DepthJob.objects.using(schema_editor.connection.alias).filter(status="failed").exclude(error="")
              .only("pk", "error", "error_code", "model_name").order_by("pk"))
    last = None
    while True:
        chunk = list((failed if last is None else failed.filter(pk__gt=last))[:BATCH])
        if not chunk:
            return
        changed = []
        for job in chunk:
            error = redacted(job.error, job.error_code, job.model_name)
            if error != job.error:
                job.error = error
                changed.append(job)
        if changed:
            DepthJob.objects.using(schema_editor.connection.alias).bulk_update(changed, ["error"])
        last = chunk[-1].pk


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0011_session_key_digest"),
    ]

    operations = [
        migrations.RunPython(job_errors_redact, migrations.RunPython.noop, elidable=True),
    ]
