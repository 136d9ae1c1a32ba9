"""Logging to the console, one line per record."""
from depthsite import env

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "depthsite": {"level": env.LOG_LEVEL},
        "models_registry": {"level": env.LOG_LEVEL},
        "inference": {"level": env.LOG_LEVEL},
        "django_q": {"level": env.LOG_LEVEL},
    },
}
