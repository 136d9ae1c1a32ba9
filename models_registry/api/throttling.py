"""Rate limits of the registry's writes and uploads, with rates read at request time."""
from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


class SettingsScopedRateThrottle(ScopedRateThrottle):
    """DRF's ScopedRateThrottle binds the rates when the module is imported; this one reads them for every
    request, so a changed REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] applies without restarting the server."""

    def get_rate(self) -> str | None:
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        if self.scope not in rates:
            raise ImproperlyConfigured(f"no throttle rate for scope {self.scope!r} in DEFAULT_THROTTLE_RATES")
        return rates[self.scope]

