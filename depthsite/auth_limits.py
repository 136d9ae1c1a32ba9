"""Limits on guessing passwords and on password-reset e-mails, counted in the default (shared) cache.

Failed sign-ins are counted per user name (in any case) and per client address, at /accounts/login/ and at
/admin/login/ alike (DEPTHSITE_LOGIN_RATE, DEPTHSITE_LOGIN_ADDRESS_RATE); password-reset requests per e-mail address
and per client address (DEPTHSITE_PASSWORD_RESET_RATE, DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE). Past a limit the form
comes back with a message and HTTP 429, and nothing is checked or sent: not the password (a right one fails too
until the window has passed, or guessing would go on at full speed), not the e-mail. The message is the same
whether the user name exists or not, as names that match no user are counted the same way.

Counted as the API's throttles count (DRF's SimpleRateThrottle: the times of recent attempts under one cache key,
pruned to the window), under keys of their own, with the client address the throttles and quotas use
(models_registry.api.throttling.client_address, which trusts X-Forwarded-For only as DEPTHSITE_TRUSTED_PROXIES says).
Rates are read from the settings per request, so an override applies without a restart.
"""
from __future__ import annotations

import hashlib
import math
import time
import unicodedata

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm
from django.contrib.auth.views import LoginView, PasswordResetView
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from rest_framework.throttling import SimpleRateThrottle

from depthsite.rates import parse_rate
from models_registry.api.throttling import client_address

LOGIN_REFUSED = "too_many_login_attempts"
RESET_REFUSED = "too_many_reset_requests"


class AttemptCounter(SimpleRateThrottle):
    """One counted thing (a user name's failed sign-ins, an address's reset requests) at the rate a setting
    names; counted only when told (`add`), never by asking (`full`)."""

    cache_format = "auth_limit_%(scope)s_%(ident)s"

    def __init__(self, setting: str, scope: str, ident: str):
        # SimpleRateThrottle's constructor reads REST_FRAMEWORK's rates; these come from their own settings.
        self.rate = getattr(settings, setting, None)
        self.num_requests, self.duration = parse_rate(self.rate) or (None, None)
        self.key = self.cache_format % {"scope": scope, "ident": ident}

    def timer(self) -> float:
        return time.time()  # looked up per call, so a test can move the clock

    def _load(self) -> None:
        self.now = self.timer()
        self.history = self.cache.get(self.key, [])
        while self.history and self.history[-1] <= self.now - self.duration:
            self.history.pop()

    def full(self) -> bool:
        """Whether the window holds as many attempts as the rate allows (nothing counted)."""
        if self.num_requests is None:
            return False
        self._load()
        return len(self.history) >= self.num_requests

    def add(self) -> None:
        """Count one attempt now (read again just before, so a concurrent one is lost only in that instant)."""
        if self.num_requests is None:
            return
        self._load()
        self.history.insert(0, self.now)
        self.cache.set(self.key, self.history, self.duration)

    def reset(self) -> None:
        self.cache.delete(self.key)

    def seconds_left(self) -> int:
        """Seconds until the oldest attempt in the window leaves it (after `full` said True)."""
        if not self.history:
            return 0
        return max(1, math.ceil(self.history[-1] + self.duration - self.now))


def _ident(text: str) -> str:
    """A user name or e-mail address as one identity whatever its case or Unicode form, hashed: a key of fixed
    length and alphabet, and no addresses in the cache."""
    folded = unicodedata.normalize("NFKC", text).strip().casefold()
    return hashlib.sha256(folded.encode()).hexdigest()[:40]


def _wait_words(seconds: int) -> str:
    if seconds < 90:
        return "a minute"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} minutes"
    return f"{math.ceil(minutes / 60)} hours"


def _refusal(counters: list[AttemptCounter]) -> int | None:
    """Seconds until every full counter has room again; None when none is full."""
    full = [counter for counter in counters if counter.full()]
    return max(counter.seconds_left() for counter in full) if full else None


# --- signing in --------------------------------------------------------------------------------------------


def login_counters(request, username: str) -> tuple[AttemptCounter | None, AttemptCounter]:
    """(this user name's failed sign-ins or None when none was given, this address's)."""
    by_name = AttemptCounter("DEPTHSITE_LOGIN_RATE", "login_user", _ident(username)) if username.strip() else None
    by_address = AttemptCounter("DEPTHSITE_LOGIN_ADDRESS_RATE", "login_address", client_address(request))
    return by_name, by_address


class LimitedLoginMixin:
    """For an AuthenticationForm: refuses before any password is checked while the user name or the address is
    over its limit, and counts each failed attempt against both. A success clears the user name's count only (an
    address guessing at many names is not let off by also knowing one password)."""

    refused_for: int | None = None  # seconds to wait, when refused

    def clean(self):
        if self.request is None:
            return super().clean()
        by_name, by_address = login_counters(self.request, str(self.data.get("username") or ""))
        counters = [counter for counter in (by_name, by_address) if counter is not None]
        self.refused_for = _refusal(counters)
        if self.refused_for is not None:
            raise ValidationError(
                f"Too many failed sign-in attempts for this user name or from your address: signing in is paused. "
                f"Try again in {_wait_words(self.refused_for)}.", code=LOGIN_REFUSED)
        try:
            cleaned = super().clean()
        except ValidationError:
            for counter in counters:
                counter.add()
            raise
        if self.get_user() is not None and by_name is not None:
            by_name.reset()
        return cleaned


class LimitedAuthenticationForm(LimitedLoginMixin, AuthenticationForm):
    pass


class LimitedAdminAuthenticationForm(LimitedLoginMixin, AdminAuthenticationForm):
    """The admin's login form (admin.site.login_form), limited like the site's: one count for both doors."""


def _too_many(response, form, field: str, code: str):
    """`response` as HTTP 429 (with Retry-After) when `form` was refused by a limit."""
    if form is not None and form.has_error(field, code):
        response.status_code = 429
        response["Retry-After"] = str(form.refused_for)
    return response


class LimitedLoginView(LoginView):
    """/accounts/login/ with the sign-in limits; a refused form is answered 429."""

    authentication_form = LimitedAuthenticationForm

    def form_invalid(self, form):
        return _too_many(super().form_invalid(form), form, NON_FIELD_ERRORS, LOGIN_REFUSED)

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        form = context.get("form")
        # The template words a wrong password its own way; a refusal is shown in its own words instead.
        refused = form is not None and form.is_bound and form.has_error(NON_FIELD_ERRORS, LOGIN_REFUSED)
        context["login_refusal"] = form.non_field_errors()[0] if refused else ""
        return context


def admin_login(request, extra_context=None):
    """The admin site's login (its form limited through admin.site.login_form), answered 429 when refused."""
    response = admin.site.login(request, extra_context)
    form = (getattr(response, "context_data", None) or {}).get("form")
    return _too_many(response, form, NON_FIELD_ERRORS, LOGIN_REFUSED)


# --- password reset ----------------------------------------------------------------------------------------


def reset_counters(request, email: str) -> list[AttemptCounter]:
    """This address's reset requests, and this e-mail address's when one was given."""
    counters = [AttemptCounter("DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE", "reset_address", client_address(request))]
    if email.strip():
        counters.append(AttemptCounter("DEPTHSITE_PASSWORD_RESET_RATE", "reset_email", _ident(email)))
    return counters


class LimitedPasswordResetForm(PasswordResetForm):
    """Every request counts against its address and its e-mail address; past either limit none is sent."""

    refused_for: int | None = None

    def __init__(self, *args, request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request

    def clean(self):
        cleaned = super().clean()
        if self.request is None:
            return cleaned
        counters = reset_counters(self.request, str(self.data.get("email") or ""))
        self.refused_for = _refusal(counters)
        if self.refused_for is not None:
            # On the e-mail field: the reset page shows that field's errors only.
            self.add_error("email", ValidationError(
                f"Too many password-reset requests for this e-mail address or from your address. "
                f"Try again in {_wait_words(self.refused_for)}.", code=RESET_REFUSED))
            return cleaned
        for counter in counters:
            counter.add()
        return cleaned


class LimitedPasswordResetView(PasswordResetView):
    """/accounts/password_reset/ with the reset limits; a refused form is answered 429 and sends nothing."""

    form_class = LimitedPasswordResetForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}

    def form_invalid(self, form):
        return _too_many(super().form_invalid(form), form, "email", RESET_REFUSED)
