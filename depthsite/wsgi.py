"""WSGI entry point (gunicorn's `depthsite.wsgi:application`, runserver's WSGI_APPLICATION)."""
import logging
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
application = get_wsgi_application()


def warm_up() -> None:
    """Do now what a web process's first request would otherwise do while a user waits.

    Django resolves the URLconf on the first request, which imports every view, form and serializer (about 270
    modules: a cold gunicorn worker's first upload took 0.12-0.5 s against 35 ms warm, bench/jobs.py's p99); the
    first reverse() then builds the reverse table, and the first message loads the translation catalogues. The
    queue's broker client is built too. It ends with no database connection open (the ORM broker opens one to
    read the autocommit state), so it is safe before a fork (gunicorn's preload_app) as well as in each worker:
    every worker gunicorn starts, at boot and after max_requests, answers its first request warm.
    """
    from django.conf import settings
    from django.db import connections
    from django.urls import get_resolver
    from django.utils import translation

    from inference.services.jobs import task_broker

    closed = [alias for alias in connections if connections[alias].connection is None]
    resolver = get_resolver()
    resolver.url_patterns  # noqa: B018 (the property imports and caches the URLconf)
    with translation.override(settings.LANGUAGE_CODE):  # loads the language's catalogues (field messages)
        resolver.reverse_dict  # noqa: B018 (what the first reverse() builds: the API's links, redirects)
    task_broker()
    for alias in closed:  # only what the warm-up opened: a caller's own connection (a test's) stays as it was
        connections[alias].close()


try:
    warm_up()
except Exception:
    # A web server must still start when, say, the database is down (the ORM broker's client reads it): its
    # requests then answer with the real error, as they did before the warm-up existed.
    logging.getLogger("depthsite.wsgi").warning("warming the web process failed; its first request will do it",
                                                exc_info=True)
