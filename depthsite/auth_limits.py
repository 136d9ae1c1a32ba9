"""Limits on guessing passwords and on password-reset e-mails, counted in the default (shared) cache.

Failed sign-ins are counted three ways, at /accounts/login/ and at /admin/login/ alike, and so are wrong old
passwords at /accounts/password_change/ and /admin/password_change/ (counted as failed sign-ins as the signed-in
user from the client's address: one count for every door, so a stolen session cannot guess the password there):

- per (user name, client address), DEPTHSITE_LOGIN_RATE (10/15m): what stops one client guessing one account;
- per client address, DEPTHSITE_LOGIN_ADDRESS_RATE (30/15m): what stops one client guessing at many names;
- per user name from every address, DEPTHSITE_LOGIN_USER_RATE (100/15m): what slows a guess spread over many
  addresses. It is the only count a stranger at another address can fill, so it is the trade-off: set high, a
  botnet gets that many guesses per window at one account; set low, anyone can keep an account's owner out (the
  owner is then refused at every address until the window ends, or until `manage.py signin_limits clear`).

Password-reset requests are counted per e-mail address and per client address (DEPTHSITE_PASSWORD_RESET_RATE,
DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE). Past a limit the form comes back with a message and HTTP 429, and nothing
is checked or sent: not the password (a right one fails too until the window has passed, or guessing would go on
at full speed), not the e-mail. The message is the same whether the user name exists or not, as names that match
no user are counted the same way. User names and e-mail addresses count in any case and Unicode form (folded).

Counting: fixed windows (a count per window of the rate's length, the windows starting at multiples of it since
the epoch), each an integer in the cache under a key naming the window. An attempt is reserved before the password
is checked, by an atomic increment of every count it touches (the cache's `incr` on Redis and LocMem; under a lock
file for the folder cache, whose `incr` is a read and a write), so parallel requests never check more passwords than
the limit allows: one whose increment passes a limit is refused and gives its increments back, so refusals fill
no count. A failure keeps its reservations. A success gives back its reservation on the address and the user
name's total (it was no failed attempt) and clears the (name, address) count of that client, the only count it
proves anything about; it never clears another address's counts, nor the address's (an address guessing at many
names is not let off by also knowing one password). That count is keyed by the folded name, which two users may
share ("Alice" and "alice": Django's user names are case-sensitive): it is cleared only when exactly one user
has the name (found case-insensitively by the database, so only for names in ASCII, where databases agree on
case; otherwise the success just gives its reservation back), so that one user's success never wipes the
guesses at another's account. Fixed windows let up to twice a limit through across a window's end; in return a
count is one integer, Retry-After is exact (the seconds until the window ends), and nothing is lost or raced.

The client address is the one the throttles and quotas use (models_registry.api.throttling.client_address, which
trusts X-Forwarded-For only as DEPTHSITE_TRUSTED_PROXIES says). Rates are read from the settings per request, so
an override applies without a restart. `manage.py signin_limits show|clear --user NAME --address ADDR` shows the
counts and clears them (a user name's through a generation in its keys, so that every address's count of the
name goes at once without listing the cache).
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm, AdminPasswordChangeForm
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm, PasswordChangeForm, PasswordResetForm
from django.contrib.auth.views import LoginView, PasswordChangeView, PasswordResetView
from django.core.cache import caches
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.urls import reverse
from django.views.decorators.debug import sensitive_variables

from depthsite.rates import parse_rate
from models_registry.api.throttling import UNKNOWN_ADDRESS, client_address

LOGIN_REFUSED = "too_many_login_attempts"
RESET_REFUSED = "too_many_reset_requests"

KEY_PREFIX = "auth_limit"
# A window's count outlives the window by this much, for clocks of several machines that disagree a little.
EXPIRY_MARGIN = 60


def _cache():
    return caches["default"]


@contextmanager
def _folder_lock(cache: FileBasedCache):
    """The folder cache's counts changed one process (and thread) at a time: an flock on a file beside them."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked, as Django's own incr is
        yield
        return
    folder = getattr(cache, "_dir", None) or "."
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "auth_limits.lock"), "a+b") as handle:  # not *.djcache: never culled
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# One step on Redis: Django's RedisCache.incr asks EXISTS, then INCRBY, so a count cleared in between (a sign-in's
# success, `signin_limits clear`) came back as -1 with no expiry; and add-then-incr could leave a count without one.
# Never below 0 (give-backs of reservations made before a clear), and a count without an expiry (left by the
# two-step incr before this script) is given one.
_REDIS_CHANGE = """
local delta = tonumber(ARGV[1])
if redis.call('exists', KEYS[1]) == 0 then
    if delta < 0 then return false end
    local value = redis.call('incrby', KEYS[1], delta)
    redis.call('expire', KEYS[1], tonumber(ARGV[2]))
    return value
end
local value = redis.call('incrby', KEYS[1], delta)
if value < 0 then
    redis.call('set', KEYS[1], 0, 'KEEPTTL')
    value = 0
end
if redis.call('ttl', KEYS[1]) == -1 then
    redis.call('expire', KEYS[1], tonumber(ARGV[2]))
end
return value
"""


def _redis_change(cache: RedisCache, key: str, delta: int, timeout: int) -> int | None:
    """_change on Redis, as one script (a missing count is created with its expiry, never taken below nothing)."""
    full_key = cache.make_and_validate_key(key)
    client = cache._cache.get_client(full_key, write=True)  # the client Django's own incr uses
    value = client.eval(_REDIS_CHANGE, 1, full_key, delta, max(1, int(timeout)))
    return None if value is None else int(value)


def _change(key: str, delta: int, timeout: int) -> int | None:
    """Add `delta` to the count under `key` at once (no other change in between) and return the new count. A
    missing count starts at 0 when adding; taking away from a missing one (cleared, expired) changes nothing."""
    cache = _cache()
    if isinstance(cache, FileBasedCache):
        with _folder_lock(cache):
            value = cache.get(key)
            if value is None and delta < 0:
                return None
            value = int(value or 0) + delta
            cache.set(key, value, timeout)
            return value
    if isinstance(cache, RedisCache):
        return _redis_change(cache, key, delta, timeout)
    if delta < 0:
        try:
            return cache.incr(key, delta)
        except ValueError:
            return None
    for _ in range(3):
        cache.add(key, 0, timeout)
        try:
            return cache.incr(key, delta)
        except ValueError:  # gone between the two (cleared, evicted): add it again
            continue
    return delta  # a cache that keeps nothing (DummyCache) counts nothing


@dataclass
class Counter:
    """One counted thing (a user name's failed sign-ins, an address's reset requests) at the rate a setting names,
    in fixed windows of the rate's length."""

    setting: str
    kind: str  # what is counted, in the keys and in `signin_limits show`
    ident: str  # who, hashed

    def __post_init__(self):
        self.rate = getattr(settings, self.setting, None)
        self.limit, self.window = parse_rate(self.rate) or (None, None)

    @property
    def on(self) -> bool:
        return self.limit is not None

    def key(self, now: float) -> str:
        return f"{KEY_PREFIX}:{self.kind}:{self.ident}:{self.window}s{int(now // self.window)}"

    def seconds_left(self, now: float) -> int:
        """Seconds until the window holding `now` ends (rounded up, at least 1)."""
        end = (int(now // self.window) + 1) * self.window
        return max(1, math.ceil(end - now))

    def count(self, now: float) -> int:
        return int(_cache().get(self.key(now)) or 0) if self.on else 0

    def full(self, now: float) -> bool:
        return self.on and self.count(now) >= self.limit

    def add(self, now: float, delta: int = 1) -> int | None:
        return _change(self.key(now), delta, self.window + EXPIRY_MARGIN)

    def clear(self, now: float) -> None:
        if self.on:
            _cache().delete(self.key(now))


class Attempt:
    """One sign-in or reset request against its counters, all read at one instant: `reserve` counts it in every
    one at once (or in none, when one is past its limit), `give_back` takes it out again."""

    def __init__(self, counters: list[Counter | None], now: float | None = None):
        self.now = time.time() if now is None else now  # time.time looked up per call: tests move the clock
        self.counters = [counter for counter in counters if counter is not None and counter.on]
        self.taken: list[Counter] = []
        self.refused_for: int | None = None  # seconds until every full counter's window has ended

    def _refuse(self, over: list[Counter]) -> None:
        full = set(map(id, over))
        over = over + [c for c in self.counters if id(c) not in full and c.full(self.now)]
        self.refused_for = max(counter.seconds_left(self.now) for counter in over)

    def peek(self) -> bool:
        """Whether a request would be let through now (nothing counted)."""
        over = [counter for counter in self.counters if counter.full(self.now)]
        if over:
            self._refuse(over)
        return not over

    def reserve(self) -> bool:
        """Count this attempt in every counter; False (nothing counted, `refused_for` set) past any limit."""
        try:
            for counter in self.counters:
                count = counter.add(self.now)
                self.taken.append(counter)
                if count is not None and count > counter.limit:
                    self.give_back()
                    self._refuse([counter])
                    return False
        except BaseException:
            # The cache failed partway (a Redis timeout): no password was checked, so nothing stays counted.
            self._give_back_quietly()
            raise
        return True

    def _give_back_quietly(self) -> None:
        """give_back, as far as the cache lets it, while another error is on its way out."""
        try:
            self.give_back()
        except Exception:  # the cache is failing; that error is the one to report
            pass

    def give_back(self, *counters: Counter) -> None:
        for counter in counters or list(self.taken):
            if counter in self.taken:
                self.taken.remove(counter)
                counter.add(self.now, -1)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip().casefold()


def _ident(text: str) -> str:
    """A user name, e-mail or client address as one identity whatever its case or Unicode form, hashed: a key of
    fixed length and alphabet, and no addresses in the cache."""
    return hashlib.sha256(_fold(text).encode()).hexdigest()[:40]


def _wait_words(seconds: int) -> str:
    if seconds < 60:
        return "less than a minute"
    minutes = math.ceil(seconds / 60)
    if minutes == 1:
        return "a minute"
    if minutes <= 60:
        return f"{minutes} minutes"
    return f"{math.ceil(minutes / 60)} hours"


# --- signing in --------------------------------------------------------------------------------------------


def address_from_text(text: str) -> str | None:
    """An address an operator typed, as the limits count it (an IPv6 address, or its "/64", as its /64 network);
    None when it is not one."""
    text = text.strip()
    if text == UNKNOWN_ADDRESS:
        return text
    if text.endswith("/64") and ":" in text:
        text = text.removesuffix("/64")
    found = client_address(SimpleNamespace(META={"REMOTE_ADDR": text}))
    return None if found == UNKNOWN_ADDRESS else found


def _generation_key(name: str) -> str:
    return f"{KEY_PREFIX}:login_generation:{_ident(name)}"


def _generation(name: str) -> str:
    """The user name's generation: part of its keys, so that a new one (`clear_login_user`) clears them all."""
    return str(_cache().get(_generation_key(name)) or "0")


def login_user_counter(name: str, generation: str | None = None) -> Counter:
    """The user name's failed sign-ins from every address."""
    generation = _generation(name) if generation is None else generation
    return Counter("DEPTHSITE_LOGIN_USER_RATE", "login_user", f"{_ident(name)}.{generation}")


def login_pair_counter(name: str, address: str, generation: str | None = None) -> Counter:
    """The user name's failed sign-ins from one client address."""
    generation = _generation(name) if generation is None else generation
    ident = hashlib.sha256(f"{_ident(name)}.{generation}\n{address}".encode()).hexdigest()[:40]
    return Counter("DEPTHSITE_LOGIN_RATE", "login_user_address", ident)


def login_address_counter(address: str) -> Counter:
    """The client address's failed sign-ins, whatever the names."""
    return Counter("DEPTHSITE_LOGIN_ADDRESS_RATE", "login_address", _ident(address))


def login_counters(address: str, username: str) -> list[Counter]:
    """The counts a sign-in as `username` from `address` touches, in the order they are reserved: the address's
    first (what most often refuses), the name's total from every address last (the count shared with others)."""
    if not username.strip():
        return [login_address_counter(address)]
    generation = _generation(username)
    return [login_address_counter(address), login_pair_counter(username, address, generation),
            login_user_counter(username, generation)]


def clear_login_user(name: str) -> None:
    """Clear the user name's counts: its total and its count from every address (a new generation)."""
    _cache().set(_generation_key(name), secrets.token_hex(6), None)


def clear_login_address(address: str) -> None:
    """Clear the address's own count (the user names' counts from it are theirs: `clear_login_user`)."""
    login_address_counter(address).clear(time.time())


def _only_user_named(name: str) -> bool:
    """Whether exactly one user has this name in its folded form (see the module's docstring)."""
    folded = _fold(name)
    if not folded.isascii():
        return False
    model = get_user_model()
    field = model.USERNAME_FIELD
    names = list(model._default_manager.filter(**{f"{field}__iexact": folded}).values_list(field, flat=True)[:2])
    return len(names) == 1 and _fold(names[0]) == folded


def _login_refusal(seconds: int) -> ValidationError:
    return ValidationError(
        f"Too many failed sign-in attempts for this user name or from your address: signing in is paused. "
        f"Try again in {_wait_words(seconds)}.", code=LOGIN_REFUSED)


def _succeeded(attempt: Attempt, counters: list[Counter], name: str) -> None:
    """A right password: its reservation on the address and the name's total given back, and the client's own
    count of the name cleared (given back instead when the folded name is not one user's alone)."""
    if len(counters) != 3:
        attempt.give_back()
        return
    by_address, by_pair, by_user = counters
    attempt.give_back(by_address, by_user)
    try:
        only_one = _only_user_named(name)
    except BaseException:  # the database failed: a right password leaves nothing counted all the same
        attempt._give_back_quietly()
        raise
    if only_one:
        by_pair.clear(attempt.now)
    else:
        attempt.give_back(by_pair)


@sensitive_variables()
def _check_within_limits(form, request, name: str, check):
    """Check a password as `name` from the request's client address, within the sign-in limits: the attempt is
    reserved in every count first, and past any limit `check` is not called (form.refused_for set, the refusal
    raised). `check()` raises ValidationError for a wrong password (the reservation stays counted) and otherwise
    returns (its result, whether a right password was proved), the reservation given back on a right one."""
    counters = login_counters(client_address(request), name)
    attempt = Attempt(counters)
    if not attempt.reserve():
        form.refused_for = attempt.refused_for
        raise _login_refusal(form.refused_for)
    try:
        result, right = check()
    except ValidationError:
        raise  # a failed attempt: its reservations stay counted
    except BaseException:
        attempt._give_back_quietly()  # no answer about the password was given; that error is the one to report
        raise
    if right:
        _succeeded(attempt, counters, name)
    return result


class LimitedLoginMixin:
    """For an AuthenticationForm: reserves the attempt in every count before any password is checked, and refuses
    without checking it past any limit; a failure keeps the reservation, a success gives it back (and clears the
    client's own count of the name; see the module's docstring)."""

    refused_for: int | None = None  # seconds to wait, when refused

    def clean(self):
        if self.request is None:
            return super().clean()
        username, password = self.cleaned_data.get("username"), self.cleaned_data.get("password")
        name = username if username is not None else str(self.data.get("username") or "")
        if username is None or not password:
            # No password is checked (the form says what is missing): nothing counted, but refused the same way.
            attempt = Attempt(login_counters(client_address(self.request), name))
            if not attempt.peek():
                self.refused_for = attempt.refused_for
                raise _login_refusal(self.refused_for)
            return super().clean()

        def check():
            cleaned = super(LimitedLoginMixin, self).clean()
            return cleaned, self.get_user() is not None

        return _check_within_limits(self, self.request, name, check)


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


# --- changing a password --------------------------------------------------------------------------------------


class _TakesRequest:
    """For a form a limit may refuse: it takes the request (`request=`, as _RefusedAs429 hands it over) and says
    how long to wait when refused."""

    refused_for: int | None = None  # seconds to wait, when refused

    def __init__(self, *args, request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request


class LimitedPasswordChangeMixin(_TakesRequest):
    """For a PasswordChangeForm: the old password is checked as a sign-in as the form's user from the request's
    client address would be, in the same counts (reserved first, refused unchecked past any limit, a wrong one
    kept counted, a right one given back)."""

    @sensitive_variables()
    def clean_old_password(self):
        if self.request is None:
            return super().clean_old_password()
        return _check_within_limits(self, self.request, self.user.get_username(),
                                    lambda: (super(LimitedPasswordChangeMixin, self).clean_old_password(), True))


class LimitedPasswordChangeForm(LimitedPasswordChangeMixin, PasswordChangeForm):
    pass


class LimitedAdminPasswordChangeForm(LimitedPasswordChangeMixin, AdminPasswordChangeForm):
    """The admin's password-change form (which AdminSite.password_change names itself), limited the same way."""


class _RefusedAs429:
    """For a form view whose form takes the request and may be refused by a limit: 429 (with Retry-After) then."""

    refused_field: str
    refused_code: str

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}

    def form_invalid(self, form):
        return _too_many(super().form_invalid(form), form, self.refused_field, self.refused_code)


class LimitedPasswordChangeView(_RefusedAs429, PasswordChangeView):
    """/accounts/password_change/ with the sign-in limits on the old password; a refused form is answered 429."""

    form_class = LimitedPasswordChangeForm
    refused_field, refused_code = "old_password", LOGIN_REFUSED


def admin_password_change(request, extra_context=None):
    """AdminSite.password_change (its template, context and success page) with the limited form. Mounted behind
    admin.site.admin_view, as the admin's own is (staff only, CSRF-protected)."""
    site = admin.site
    defaults = {
        "form_class": LimitedAdminPasswordChangeForm,
        "success_url": reverse("admin:password_change_done", current_app=site.name),
        "extra_context": {**site.each_context(request), **(extra_context or {})},
    }
    if site.password_change_template is not None:
        defaults["template_name"] = site.password_change_template
    request.current_app = site.name
    return LimitedPasswordChangeView.as_view(**defaults)(request)


# --- password reset ----------------------------------------------------------------------------------------


def reset_counters(request, email: str) -> list[Counter]:
    """This address's reset requests, and this e-mail address's when one was given."""
    counters = [Counter("DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE", "reset_address", _ident(client_address(request)))]
    if email.strip():
        counters.append(Counter("DEPTHSITE_PASSWORD_RESET_RATE", "reset_email", _ident(email)))
    return counters


class LimitedPasswordResetForm(_TakesRequest, PasswordResetForm):
    """Every request is counted (reserved before anything is sent) against its address and its e-mail address;
    past either limit none is sent, and the refused request is not counted."""

    def clean(self):
        cleaned = super().clean()
        if self.request is None:
            return cleaned
        attempt = Attempt(reset_counters(self.request, str(self.data.get("email") or "")))
        if not attempt.reserve():
            self.refused_for = attempt.refused_for
            # On the e-mail field: the reset page shows that field's errors only.
            self.add_error("email", ValidationError(
                f"Too many password-reset requests for this e-mail address or from your address. "
                f"Try again in {_wait_words(self.refused_for)}.", code=RESET_REFUSED))
        return cleaned


class LimitedPasswordResetView(_RefusedAs429, PasswordResetView):
    """/accounts/password_reset/ with the reset limits; a refused form is answered 429 and sends nothing."""

    form_class = LimitedPasswordResetForm
    refused_field, refused_code = "email", RESET_REFUSED
