"""WSGI entry point (gunicorn's `depthsite.wsgi:application`, runserver's WSGI_APPLICATION)."""
import logging
import os
from importlib import import_module

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
application = get_wsgi_application()


def warm_up() -> None:
    """Do now what a web process's first request would otherwise do while a user waits.

    Django resolves the URLconf on the first request, which imports every view, form and serializer (about 270
    modules: a cold gunicorn worker's first upload took 0.12-0.5 s against 35 ms warm, bench/jobs.py's p99); the
    first reverse() then builds the reverse table, and the first message loads the translation catalogues. The
    queue's client is made ready too. Nothing here touches the database or opens a socket, so it is safe before
    a fork (gunicorn's preload_app: each worker then makes its own broker client, its modules already loaded)
    and quick when a server is down.
    """
    from django.conf import settings
    from django.urls import get_resolver
    from django.utils import translation

    resolver = get_resolver()
    resolver.url_patterns  # noqa: B018 (the property imports and caches the URLconf)
    with translation.override(settings.LANGUAGE_CODE):  # loads the language's catalogues (field messages)
        resolver.reverse_dict  # noqa: B018 (what the first reverse() builds: the API's links, redirects)
    if "orm" in settings.Q_CLUSTER:
        # The ORM broker's client reads the database as it is made: its module only, or a database that drops
        # packets would hold every worker's boot for a TCP timeout.
        import_module("django_q.brokers.orm")
    else:
        from inference.services.jobs import task_broker

        task_broker()  # the Redis client connects on first use


def warm_up_or_log() -> bool:
    """warm_up(), or one warning: a web server must start whatever the warm-up meets (its requests then answer
    with the real error, as they did before the warm-up existed)."""
    try:
        warm_up()
    except Exception:
        logging.getLogger("depthsite.wsgi").warning("warming the web process failed; its first request will do it",
                                                    exc_info=True)
        return False
    return True


warm_up_or_log()
