"""Who a client is for rate limits and quotas (one function, proxy-aware only when configured), and the
registry's throttle with rates read at request time."""
from __future__ import annotations

import ipaddress

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle

UNKNOWN_ADDRESS = "unknown"


def _normalised(text: str) -> str | None:
    """An address as one identity: IPv4 as is, an IPv4-mapped IPv6 as IPv4, other IPv6 as its /64 network
    (one customer line gets a whole /64, so single IPv6 addresses would be free quota)."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


def client_address(request) -> str:
    """The client's address as every throttle and anonymous quota counts it.

    X-Forwarded-For is written by whoever sends the request, so it is only read when
    DEPTHSITE_TRUSTED_PROXIES says how many proxies in front of the site append to it: with N, the
    client is the Nth address from the right (the one the outermost trusted proxy saw). With 0 (the
    default) only the peer address counts, whatever headers say.
    """
    meta = request.META
    remote = _normalised(meta.get("REMOTE_ADDR") or "")
    proxies = int(getattr(settings, "DEPTHSITE_TRUSTED_PROXIES", 0) or 0)
    forwarded = meta.get("HTTP_X_FORWARDED_FOR") or ""
    if proxies > 0 and forwarded:
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            # Fewer hops than proxies: the request skipped a proxy, so the leftmost is the best we know.
            candidate = _normalised(hops[-min(proxies, len(hops))])
            if candidate is not None:
                return candidate
    return remote or UNKNOWN_ADDRESS


class LiveRatesMixin:
    """For DRF throttles: the rate of `self.scope` read from settings on every request (DRF binds it when the
    module is imported), so a changed REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] applies without a restart; and
    anonymous callers counted by `client_address`, never by a header they wrote."""

    scope: str

    def get_rate(self) -> str | None:
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        if self.scope not in rates:
            raise ImproperlyConfigured(f"no throttle rate for scope {self.scope!r} in DEFAULT_THROTTLE_RATES")
        return rates[self.scope]

    def get_ident(self, request) -> str:
        return client_address(request)


class SettingsScopedRateThrottle(LiveRatesMixin, ScopedRateThrottle):
    """DRF's ScopedRateThrottle with the rates read per request (LiveRatesMixin)."""
