"""Password guessing and reset e-mails are limited (depthsite.auth_limits): failed sign-ins per (user name, client
address), per client address and per user name from every address, at /accounts/login/ and /admin/login/; reset
requests per e-mail address and per client address. Counted in fixed windows, reserved before the password is
checked; `manage.py signin_limits` shows and clears the counts."""
from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.core import mail
from django.core.cache import cache
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.db import connections
from django.test import RequestFactory

pytestmark = pytest.mark.django_db

LOGIN, ADMIN_LOGIN, RESET = "/accounts/login/", "/admin/login/", "/accounts/password_reset/"
PASSWORD = "pw-alice-right-123"
REFUSED = "Too many failed sign-in attempts"


@pytest.fixture(autouse=True)
def _fresh_counts(settings):
    """The counts live in the default cache, which outlives a test; the rates are the documented defaults."""
    settings.DEPTHSITE_LOGIN_RATE = "10/15m"
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "30/15m"
    settings.DEPTHSITE_LOGIN_USER_RATE = "100/15m"
    settings.DEPTHSITE_PASSWORD_RESET_RATE = "5/hour"
    settings.DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE = "5/hour"
    settings.DEPTHSITE_TRUSTED_PROXIES = 0
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", "alice@example.com", PASSWORD)


# The start of a quarter of an hour and of an hour (the windows are fixed: they start at multiples of their length).
WINDOW_START = 1_800_000_000.0


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The clock held still at the start of a window, moved by `clock.skip(seconds)` or `clock.at(seconds into
    the window)` (the counts and the cache's expiry both read it): no test meets a window's end by chance."""

    class Clock:
        now = WINDOW_START

        def skip(self, seconds: float) -> None:
            self.now += seconds

        def at(self, seconds: float) -> None:
            self.now = WINDOW_START + seconds

    # The clock is moved where the counts and the caches' expiry read it, not in the time module itself: a module
    # first imported under a patched time.time keeps it for good where it takes it as a class attribute (DRF's
    # SimpleRateThrottle.timer, imported with the URLconf at the first request), and later files' requests failed.
    import django.core.cache.backends.base
    import django.core.cache.backends.filebased
    import django.core.cache.backends.locmem

    import depthsite.auth_limits
    import inference.management.commands.signin_limits

    held = Clock()

    class HeldTime:
        """The time module, its time() held."""

        def time(self) -> float:
            return held.now

        def __getattr__(self, name):
            return getattr(time, name)

    for module in (depthsite.auth_limits, inference.management.commands.signin_limits,
                   django.core.cache.backends.base, django.core.cache.backends.filebased,
                   django.core.cache.backends.locmem):
        monkeypatch.setattr(module, "time", HeldTime())
    return held


def _login(client, username, password, url=LOGIN, address="203.0.113.7", **extra):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address, **extra)


def _signed_in(client) -> bool:
    return SESSION_KEY in client.session


def _fail(client, username, times, url=LOGIN, address="203.0.113.7"):
    for _ in range(times):
        response = _login(client, username, "wrong-guess", url=url, address=address)
        assert response.status_code == 200 and REFUSED not in response.content.decode()


def test_the_eleventh_try_after_ten_failures_is_refused_even_with_the_right_password(client, alice):
    _fail(client, "alice", 10)
    refused = _login(client, "alice", PASSWORD)
    page = refused.content.decode()
    assert refused.status_code == 429 and REFUSED in page and int(refused["Retry-After"]) > 0
    assert "did not match" not in page  # the page words the refusal, not a wrong password
    assert not _signed_in(client)
    # The user name in any case is the same name.
    assert _login(client, "ALICE", PASSWORD).status_code == 429 and not _signed_in(client)


def test_the_right_password_before_the_limit_signs_in(client, alice):
    _fail(client, "alice", 9)
    response = _login(client, "alice", PASSWORD)
    assert response.status_code == 302 and _signed_in(client)


def test_a_name_of_no_user_is_counted_and_refused_in_the_same_words(client, alice):
    _fail(client, "alice", 10)
    _fail(client, "nobody", 10)
    known, unknown = _login(client, "alice", "x"), _login(client, "nobody", "x")
    assert known.status_code == unknown.status_code == 429
    assert known["Retry-After"] == unknown["Retry-After"]
    assert _page(known, "alice") == _page(unknown, "nobody")


def _page(response, username: str) -> str:
    """The page with the user name and the form's CSRF token blanked."""
    text = response.content.decode().replace(username, "NAME")
    return re.sub(r'name="csrfmiddlewaretoken" value="[^"]*"', "", text)


def test_other_names_are_let_through_until_the_address_limit(client, alice, settings):
    get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob-right-123")
    _fail(client, "alice", 10)
    assert _login(client, "bob", "pw-bob-right-123").status_code == 302  # another name: not refused
    client.logout()
    for name in ("carol", "dave"):
        _fail(client, name, 10)  # the address's 30th failure
    refused = _login(client, "bob", "pw-bob-right-123")
    assert refused.status_code == 429 and REFUSED in refused.content.decode() and not _signed_in(client)
    # Another address may sign in as bob, and as alice: her name's count from 203.0.113.7 is that address's own.
    assert _login(client, "bob", "pw-bob-right-123", address="198.51.100.9").status_code == 302
    client.logout()
    assert _login(client, "alice", PASSWORD, address="198.51.100.9").status_code == 302


def test_a_forwarded_for_header_is_no_way_around_the_address_limit(client, alice, settings):
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "3/15m"
    for number in range(3):
        _login(client, f"user{number}", "x", HTTP_X_FORWARDED_FOR=f"10.0.0.{number}")
    refused = _login(client, "alice", PASSWORD, HTTP_X_FORWARDED_FOR="10.0.0.99")
    assert refused.status_code == 429 and not _signed_in(client)


def test_a_success_clears_the_name_count_but_not_the_address_count(client, alice, settings):
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "12/15m"
    _fail(client, "alice", 9)
    assert _login(client, "alice", PASSWORD).status_code == 302
    client.logout()
    _fail(client, "alice", 2)  # the name's count starts again (2 of 10); the address's is at 11 of 12
    _fail(client, "someone", 1)
    assert _login(client, "alice", PASSWORD).status_code == 429


def test_a_post_without_a_password_checks_nothing_counts_nothing_and_clears_nothing(client, alice):
    _fail(client, "alice", 9, address="198.51.100.9")
    for _ in range(5):  # not counted: no password was checked
        client.post(LOGIN, {"username": "alice", "password": ""}, REMOTE_ADDR="198.51.100.9")
    assert _login(client, "alice", PASSWORD, address="198.51.100.9").status_code == 302
    client.logout()
    _fail(client, "alice", 10)
    response = client.post(LOGIN, {"username": "alice", "password": ""}, REMOTE_ADDR="203.0.113.7")
    assert response.status_code == 429  # refused in the same words, though nothing would have been checked
    client.post(LOGIN, {"username": "alice"}, REMOTE_ADDR="203.0.113.7")
    assert _login(client, "alice", PASSWORD).status_code == 429


def test_the_admin_login_is_limited_and_shares_the_count(client, db):
    get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-right-123")
    _fail(client, "root", 6, url=LOGIN)
    _fail(client, "root", 4, url=ADMIN_LOGIN)
    refused = _login(client, "root", "pw-root-right-123", url=ADMIN_LOGIN)
    assert refused.status_code == 429 and REFUSED in refused.content.decode() and not _signed_in(client)
    assert _login(client, "root", "pw-root-right-123", url=LOGIN).status_code == 429
    # The admin's page still works for a name with room left.
    get_user_model().objects.create_superuser("admin2", "a2@example.com", "pw-admin2-right-123")
    assert _login(client, "admin2", "pw-admin2-right-123", url=ADMIN_LOGIN).status_code == 302


def test_the_counts_expire_with_their_window(client, alice, clock):
    _fail(client, "alice", 10)
    clock.skip(14 * 60)
    assert _login(client, "alice", PASSWORD).status_code == 429
    clock.skip(61)
    response = _login(client, "alice", PASSWORD)
    assert response.status_code == 302 and _signed_in(client)


def test_the_counts_start_again_when_their_window_ends(client, alice, clock):
    _fail(client, "alice", 5)
    clock.skip(10 * 60)
    _fail(client, "alice", 5)
    assert _login(client, "alice", PASSWORD).status_code == 429
    clock.skip(5 * 60)  # the next quarter of an hour: a fixed window, counted from nothing
    _fail(client, "alice", 9)
    assert _login(client, "alice", PASSWORD).status_code == 302


def test_a_limit_can_be_turned_off(client, alice, settings):
    settings.DEPTHSITE_LOGIN_RATE = "off"
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "off"
    settings.DEPTHSITE_LOGIN_USER_RATE = "off"
    _fail(client, "alice", 120)
    assert _login(client, "alice", PASSWORD).status_code == 302


A, B = "203.0.113.7", "198.51.100.9"


def test_a_lockout_from_one_address_does_not_refuse_the_right_password_from_another(client, alice, settings):
    settings.DEPTHSITE_LOGIN_USER_RATE = "20/15m"
    _fail(client, "alice", 10, address=A)
    for _ in range(30):  # refused, so not counted: a refusal fills neither alice's total nor the address's count
        assert _login(client, "alice", PASSWORD, address=A).status_code == 429
    response = _login(client, "alice", PASSWORD, address=B)
    assert response.status_code == 302 and _signed_in(client)


def test_the_user_name_total_from_every_address_refuses_every_address(client, alice, settings):
    settings.DEPTHSITE_LOGIN_USER_RATE = "25/15m"
    _fail(client, "alice", 10, address=A)
    assert _login(client, "alice", PASSWORD, address=B).status_code == 302  # not counted: a success gives back
    client.logout()
    _fail(client, "alice", 10, address="192.0.2.1")
    _fail(client, "alice", 5, address="192.0.2.2")  # 25 failures for the name, from three addresses
    for url in (LOGIN, ADMIN_LOGIN):
        refused = _login(client, "alice", PASSWORD, url=url, address=B)
        assert refused.status_code == 429 and REFUSED in refused.content.decode() and not _signed_in(client)
    get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob-right-123")
    assert _login(client, "bob", "pw-bob-right-123", address=B).status_code == 302  # other names: not refused


def test_a_success_does_not_clear_the_count_of_another_user_whose_name_differs_in_case(client, alice):
    get_user_model().objects.create_user("Alice", "big-alice@example.com", "pw-big-alice-123")
    _fail(client, "alice", 9)
    # "Alice" is another user: her success is not counted, but it clears nothing of the name they share.
    assert _login(client, "Alice", "pw-big-alice-123").status_code == 302
    client.logout()
    _fail(client, "alice", 1)
    assert _login(client, "alice", PASSWORD).status_code == 429


def _guess_at_once(monkeypatch, threads: int, *, username="alice", address=A) -> tuple[list[str], list[bool]]:
    """`threads` wrong guesses at the same moment, each through the limited form in a thread of its own, with the
    password check slowed down so that they overlap: (the names whose password was checked, refused or not)."""
    import django.contrib.auth.forms as auth_forms
    from django.core.exceptions import NON_FIELD_ERRORS

    from depthsite.auth_limits import LOGIN_REFUSED, LimitedAuthenticationForm

    lock, barrier = threading.Lock(), threading.Barrier(threads, timeout=30)
    checked: list[str] = []
    refused: list[bool] = []

    def slow_authenticate(request=None, **credentials):
        with lock:
            checked.append(credentials["username"])
        time.sleep(0.05)
        return None

    monkeypatch.setattr(auth_forms, "authenticate", slow_authenticate)

    def guess():
        request = RequestFactory().post(LOGIN, REMOTE_ADDR=address)
        form = LimitedAuthenticationForm(request, data={"username": username, "password": "wrong-guess"})
        barrier.wait()
        form.is_valid()
        with lock:
            refused.append(form.has_error(NON_FIELD_ERRORS, LOGIN_REFUSED))

    workers = [threading.Thread(target=guess) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(refused) == threads
    return checked, refused


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_cache(settings):
    """Redis as the site's cache, under a key prefix of this test's own (its keys removed afterwards)."""
    import uuid

    import redis

    from tests.conftest import require_service

    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"test-auth-limits-{uuid.uuid4().hex[:12]}"
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                                   "KEY_PREFIX": prefix}}
    client = redis.Redis.from_url(REDIS_URL)
    yield client, prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(params=["locmem", "files", pytest.param("redis", marks=pytest.mark.services)])
def any_shared_cache(request, settings, tmp_path):
    """The test settings' cache (LocMem), the folder cache a site without Redis counts in, and Redis."""
    if request.param == "files":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                                       "LOCATION": str(tmp_path / "cache")}}
    if request.param == "redis":
        request.getfixturevalue("redis_cache")
    return request.param


@pytest.mark.services
def test_on_redis_a_count_is_created_with_its_expiry_and_a_give_back_never_makes_one(redis_cache):
    # Django's RedisCache.incr asks EXISTS and then INCRBY: a count cleared between the two came back as -1, with
    # no expiry. depthsite.auth_limits changes counts on Redis in one script.
    from depthsite.auth_limits import _change

    client, prefix = redis_cache
    assert _change("pair", 1, 960) == 1 and _change("pair", 1, 960) == 2
    (stored,) = client.keys(f"{prefix}:*pair")
    assert 900 < client.ttl(stored) <= 960
    assert _change("pair", -1, 960) == 1
    client.delete(stored)  # cleared (a success, `signin_limits clear`) while an attempt was under way
    assert _change("pair", -1, 960) is None
    assert not client.exists(stored)
    assert cache.get("pair") is None and _change("pair", 1, 960) == 1 and cache.get("pair") == 1


@pytest.mark.services
def test_on_redis_a_clear_racing_a_give_back_leaves_no_negative_count_without_expiry(redis_cache, monkeypatch):
    from django.core.cache.backends.redis import RedisCacheClient

    from depthsite.auth_limits import _change

    client, prefix = redis_cache
    assert _change("pair", 2, 960) == 2
    (stored,) = client.keys(f"{prefix}:*pair")
    real_get_client = RedisCacheClient.get_client

    class ClearedRightAfterExists:
        """A client on which the count is cleared just after any EXISTS about it answers (another request)."""

        def __init__(self, real):
            self.real = real

        def exists(self, *keys):
            answer = self.real.exists(*keys)
            self.real.delete(*keys)
            return answer

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(RedisCacheClient, "get_client",
                        lambda self, *a, **k: ClearedRightAfterExists(real_get_client(self, *a, **k)))
    result = _change("pair", -1, 960)
    # Either the count was there (and is now 1, with its expiry) or it was gone (and stays gone): never -1.
    if client.exists(stored):
        assert result == 1 == int(client.get(stored)) and client.ttl(stored) > 0
    else:
        assert result is None


@pytest.mark.services
def test_on_redis_a_count_never_goes_below_nothing_and_an_old_one_gets_an_expiry(redis_cache):
    from depthsite.auth_limits import _change

    client, prefix = redis_cache
    assert _change("pair", 1, 960) == 1
    (stored,) = client.keys(f"{prefix}:*pair")
    # Give-backs of reservations made before a clear and a new guess: the count stops at 0, its expiry kept.
    assert _change("pair", -1, 960) == 0 and _change("pair", -1, 960) == 0
    assert int(client.get(stored)) == 0 and client.ttl(stored) > 0
    # A count the two-step incr left at -1 without an expiry is mended at its next change.
    client.set(stored, -1)
    assert client.ttl(stored) == -1
    assert _change("pair", 1, 960) == 0 and client.ttl(stored) > 0


def test_a_cache_failing_partway_through_a_reservation_leaves_nothing_counted(monkeypatch):
    import depthsite.auth_limits as limits

    counters = limits.login_counters("203.0.113.7", "alice")
    real_add = limits.Counter.add

    def failing_on_the_pair(counter, now, delta=1):
        if counter.kind == "login_user_address" and delta > 0:
            raise ConnectionError("the cache timed out")
        return real_add(counter, now, delta)

    monkeypatch.setattr(limits.Counter, "add", failing_on_the_pair)
    attempt = limits.Attempt(counters)
    with pytest.raises(ConnectionError):
        attempt.reserve()
    assert [counter.count(attempt.now) for counter in counters] == [0, 0, 0]


def test_the_admins_password_change_address_is_the_limited_view():
    # Where the admin is mounted, its own password-change URL (which its templates link to) must reach this view.
    from django.urls import resolve, reverse

    from depthsite.auth_limits import admin_password_change

    view = resolve(reverse("admin:password_change")).func
    while view is not admin_password_change and hasattr(view, "__wrapped__"):
        view = view.__wrapped__
    assert view is admin_password_change


def test_parallel_guesses_never_check_more_passwords_than_the_limit(monkeypatch, any_shared_cache):
    checked, refused = _guess_at_once(monkeypatch, 30)
    assert len(checked) == 10 and refused.count(True) == 20
    counts = _counts(user="alice", address=A)
    assert [counts[kind]["attempts"] for kind in ("user_address", "address", "user")] == [10, 10, 10]


def test_parallel_failures_are_all_counted(monkeypatch, settings, any_shared_cache):
    settings.DEPTHSITE_LOGIN_RATE = settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "100/15m"
    checked, refused = _guess_at_once(monkeypatch, 30)
    assert len(checked) == 30 and not any(refused)
    counts = _counts(user="alice", address=A)
    assert [counts[kind]["attempts"] for kind in ("user_address", "address", "user")] == [30, 30, 30]


def test_retry_after_is_the_time_left_in_the_window(client, alice, clock):
    clock.at(600.25)
    _fail(client, "alice", 10)
    refused = _login(client, "alice", PASSWORD)
    assert refused.status_code == 429 and refused["Retry-After"] == "300"  # 900 - 600.25, rounded up
    assert "Try again in 5 minutes." in refused.content.decode()
    clock.at(899.5)
    refused = _login(client, "alice", PASSWORD)
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert "Try again in less than a minute." in refused.content.decode()
    clock.at(900)
    assert _login(client, "alice", PASSWORD).status_code == 302


def test_retry_after_waits_for_the_last_full_count(client, alice, settings, clock):
    settings.DEPTHSITE_LOGIN_RATE = "3/15m"
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "3/1h"
    clock.at(600)
    _fail(client, "alice", 3)
    refused = _login(client, "alice", PASSWORD)
    assert refused["Retry-After"] == "3000" and "Try again in 50 minutes." in refused.content.decode()
    clock.at(900)  # the name's window has ended, the address's has not
    assert _login(client, "alice", PASSWORD)["Retry-After"] == "2700"


@pytest.mark.parametrize(("seconds", "words"), [
    (1, "less than a minute"), (59, "less than a minute"), (60, "a minute"), (61, "2 minutes"),
    (900, "15 minutes"), (3600, "60 minutes"), (7200, "2 hours"),
])
def test_the_wait_is_worded_to_the_minute(seconds, words):
    from depthsite.auth_limits import _wait_words

    assert _wait_words(seconds) == words


# --- changing a password ----------------------------------------------------------------------------------

CHANGE, ADMIN_CHANGE = "/accounts/password_change/", "/admin/password_change/"
NEW_PASSWORD = "new-pw-alice-456-xyz"
WRONG_OLD = "Your old password was entered incorrectly"


def _change(client, old, url=CHANGE, address=A):
    return client.post(url, {"old_password": old, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
                       REMOTE_ADDR=address)


def _wrong_old(client, times, url=CHANGE, address=A):
    for _ in range(times):
        response = _change(client, "wrong-guess", url=url, address=address)
        page = response.content.decode()
        assert response.status_code == 200 and WRONG_OLD in page and REFUSED not in page


def _password_is(user, password) -> bool:
    user.refresh_from_db()
    return user.check_password(password)


@pytest.mark.parametrize("url", [CHANGE, ADMIN_CHANGE])
def test_wrong_old_passwords_past_the_limit_refuse_even_the_right_one(client, alice, url):
    # A stolen session cookie is no way to guess the account's password at either password-change page.
    alice.is_staff = True
    alice.save()
    client.force_login(alice)
    _wrong_old(client, 10, url=url)
    refused = _change(client, PASSWORD, url=url)
    page = refused.content.decode()
    assert refused.status_code == 429 and REFUSED in page and int(refused["Retry-After"]) > 0
    assert WRONG_OLD not in page  # refused unchecked, not told the password is wrong
    assert _password_is(alice, PASSWORD)
    # The other page is refused as well (one count), and so is signing in as alice from this address.
    other = ADMIN_CHANGE if url == CHANGE else CHANGE
    assert _change(client, PASSWORD, url=other).status_code == 429 and _password_is(alice, PASSWORD)
    client.logout()
    assert _login(client, "alice", PASSWORD, address=A).status_code == 429


def test_the_admin_password_change_keeps_its_template_login_and_success_page(client, alice):
    assert client.get(ADMIN_CHANGE).status_code == 302  # anonymous: to the admin's login
    client.force_login(alice)  # not staff
    response = client.get(ADMIN_CHANGE)
    assert response.status_code == 302 and response["Location"].startswith(ADMIN_LOGIN)
    alice.is_staff = True
    alice.save()
    client.force_login(alice)
    page = client.get(ADMIN_CHANGE)
    assert page.status_code == 200 and "depthsite administration" in page.content.decode()
    changed = _change(client, PASSWORD, url=ADMIN_CHANGE)
    assert changed.status_code == 302 and changed["Location"] == "/admin/password_change/done/"
    assert _password_is(alice, NEW_PASSWORD) and _signed_in(client)


def test_failed_sign_ins_and_wrong_old_passwords_add_up(client, alice):
    _fail(client, "alice", 6, address=A)
    client.force_login(alice)
    _wrong_old(client, 4)
    assert _change(client, PASSWORD).status_code == 429 and _password_is(alice, PASSWORD)
    client.logout()
    refused = _login(client, "alice", PASSWORD, address=A)
    assert refused.status_code == 429 and not _signed_in(client)
    counts = _counts(user="alice", address=A)
    assert [counts[kind]["attempts"] for kind in ("user_address", "address", "user")] == [10, 10, 10]
    # Another address's count of the name has room: its sign-in and password change go through.
    assert _login(client, "alice", PASSWORD, address=B).status_code == 302
    assert _change(client, PASSWORD, address=B).status_code == 302 and _password_is(alice, NEW_PASSWORD)


def test_the_address_limit_counts_wrong_old_passwords_of_any_user(client, alice, settings):
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "5/15m"
    _fail(client, "carol", 3, address=A)
    client.force_login(alice)
    _wrong_old(client, 2)
    assert _change(client, PASSWORD).status_code == 429 and _password_is(alice, PASSWORD)


def test_a_right_old_password_gives_its_reservation_back(client, alice):
    _fail(client, "alice", 3, address=A)
    client.force_login(alice)
    _wrong_old(client, 6)
    changed = _change(client, PASSWORD)
    assert changed.status_code == 302 and _password_is(alice, NEW_PASSWORD)
    counts = _counts(user="alice", address=A)
    # Not counted in the address's count nor the name's total; the client's own count of the name is cleared,
    # as a sign-in's success clears it.
    assert [counts[kind]["attempts"] for kind in ("user_address", "address", "user")] == [0, 9, 9]


def test_a_right_old_password_with_unusable_new_ones_is_not_counted(client, alice):
    client.force_login(alice)
    _wrong_old(client, 9)
    for _ in range(3):  # the old password is right: not a failure, though the new ones do not match
        response = client.post(CHANGE, {"old_password": PASSWORD, "new_password1": NEW_PASSWORD,
                                        "new_password2": NEW_PASSWORD + "x"}, REMOTE_ADDR=A)
        assert response.status_code == 200 and WRONG_OLD not in response.content.decode()
    assert _counts(user="alice", address=A)["address"]["attempts"] == 9
    assert _password_is(alice, PASSWORD)


def test_the_password_change_retry_after_is_the_time_left_in_the_window(client, alice, clock):
    clock.at(600.25)
    client.force_login(alice)
    _wrong_old(client, 10)
    refused = _change(client, PASSWORD)
    assert refused.status_code == 429 and refused["Retry-After"] == "300"
    assert "Try again in 5 minutes." in refused.content.decode()
    clock.at(900)
    assert _change(client, PASSWORD).status_code == 302 and _password_is(alice, NEW_PASSWORD)


# --- password reset --------------------------------------------------------------------------------------


def _reset(client, email, address="203.0.113.7"):
    return client.post(RESET, {"email": email}, REMOTE_ADDR=address)


def test_reset_requests_are_limited_per_email(client, alice, settings):
    settings.DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE = "100/hour"
    for _ in range(5):
        assert _reset(client, "alice@example.com").status_code == 302
    assert len(mail.outbox) == 5
    for email, address in (("alice@example.com", "203.0.113.7"), ("ALICE@Example.com", "198.51.100.9")):
        refused = _reset(client, email, address)
        assert refused.status_code == 429 and "Too many password-reset requests" in refused.content.decode()
    assert len(mail.outbox) == 5  # nothing more was sent
    assert _reset(client, "other@example.com").status_code == 302


def test_reset_requests_are_limited_per_address(client, alice, settings):
    settings.DEPTHSITE_PASSWORD_RESET_RATE = "100/hour"
    for number in range(5):
        assert _reset(client, f"someone{number}@example.com").status_code == 302
    assert _reset(client, "alice@example.com").status_code == 429
    assert mail.outbox == []
    assert _reset(client, "alice@example.com", address="198.51.100.9").status_code == 302
    assert len(mail.outbox) == 1


def test_reset_counts_expire(client, alice, clock):
    for _ in range(5):
        _reset(client, "alice@example.com")
    assert _reset(client, "alice@example.com").status_code == 429
    clock.skip(3601)
    assert _reset(client, "alice@example.com").status_code == 302
    assert len(mail.outbox) == 6


def test_parallel_reset_requests_never_pass_the_limit(alice, monkeypatch):
    from django.core.cache.backends.locmem import LocMemCache

    from depthsite.auth_limits import LimitedPasswordResetForm

    real_get = LocMemCache.get

    def slow_get(self, *args, **kwargs):  # widens the gap between reading a count and writing it back
        time.sleep(0.02)
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(LocMemCache, "get", slow_get)
    lock, barrier, accepted = threading.Lock(), threading.Barrier(20, timeout=30), []

    def ask():
        request = RequestFactory().post(RESET, REMOTE_ADDR=A)
        form = LimitedPasswordResetForm(data={"email": "alice@example.com"}, request=request)
        barrier.wait()
        valid = form.is_valid()
        with lock:
            accepted.append(valid)

    workers = [threading.Thread(target=ask) for _ in range(20)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(accepted) == 20 and accepted.count(True) == 5


def test_reset_retry_after_is_the_time_left_in_the_hour(client, alice, clock):
    clock.at(1800)
    for _ in range(5):
        _reset(client, "alice@example.com")
    refused = _reset(client, "alice@example.com")
    assert refused.status_code == 429 and refused["Retry-After"] == "1800"
    assert "Try again in 30 minutes." in refused.content.decode()


def test_the_pages_still_show_their_forms(client):
    assert client.get(LOGIN).status_code == 200
    assert client.get(ADMIN_LOGIN).status_code == 200
    assert client.get(RESET).status_code == 200


# --- the rate settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [
    ("10/15m", (10, 900)), ("30/hour", (30, 3600)), ("5/h", (5, 3600)), ("3/2d", (3, 172800)),
    ("1/second", (1, 1)), ("7/ 90s", (7, 90)), (" 4/MIN ", (4, 60)), ("off", None), ("OFF", None),
])
def test_rates_are_read_in_both_spellings(text, parsed):
    from depthsite.rates import parse_rate

    assert parse_rate(text) == parsed


@pytest.mark.parametrize("text", ["10", "10/", "/15m", "ten/m", "10/15", "10/15x", "0/m", "10/0m", "-1/m", "10/m/s"])
def test_malformed_rates_are_refused(text):
    from depthsite.rates import parse_rate

    with pytest.raises(ValueError):
        parse_rate(text)


def test_a_malformed_rate_in_the_environment_stops_the_start(monkeypatch):
    from depthsite.env import EnvError
    from depthsite.env import get_rate as _rate

    monkeypatch.setenv("DEPTHSITE_LOGIN_RATE", "10 per minute")
    with pytest.raises(EnvError, match="DEPTHSITE_LOGIN_RATE"):
        _rate("DEPTHSITE_LOGIN_RATE", "10/15m")
    monkeypatch.setenv("DEPTHSITE_LOGIN_RATE", "off")
    assert _rate("DEPTHSITE_LOGIN_RATE", "10/15m") is None
    monkeypatch.delenv("DEPTHSITE_LOGIN_RATE")
    assert _rate("DEPTHSITE_LOGIN_RATE", "10/15m") == "10/15m"


# --- manage.py signin_limits ---------------------------------------------------------------------------------


def _counts(user=None, address=None) -> dict:
    """`signin_limits show --json`'s counts by kind (user, user_address, address)."""
    out = io.StringIO()
    options = [*(["--user", user] if user else []), *(["--address", address] if address else [])]
    call_command("signin_limits", "show", *options, "--json", stdout=out)
    return {row["kind"]: row for row in json.loads(out.getvalue())["counts"]}


def test_the_command_shows_the_counts_and_their_limits(client, alice, clock):
    clock.at(300)
    _fail(client, "alice", 3, address=A)
    _fail(client, "alice", 2, address="2001:db8::5")
    assert _login(client, "alice", PASSWORD, address=B).status_code == 302  # a success counts nowhere
    counts = _counts(user="ALICE", address=A)
    assert counts["user"] == {"kind": "user", "setting": "DEPTHSITE_LOGIN_USER_RATE", "rate": "100/15m",
                              "attempts": 5, "limit": 100, "window_seconds": 900, "seconds_left": 600, "full": False}
    assert (counts["user_address"]["attempts"], counts["user_address"]["limit"]) == (3, 10)
    assert (counts["address"]["attempts"], counts["address"]["limit"]) == (3, 30)
    assert _counts(address=B)["address"]["attempts"] == 0
    assert set(_counts(address="2001:db8::1234")) == {"address"}  # an IPv6 address counts as its /64
    assert _counts(address="2001:db8::1234")["address"]["attempts"] == 2
    out = io.StringIO()
    call_command("signin_limits", "show", "--user", "alice", "--address", A, stdout=out)
    text = out.getvalue()
    assert "5 of 100" in text and "3 of 10" in text and "3 of 30" in text and "DEPTHSITE_LOGIN_USER_RATE" in text


def test_clearing_a_user_name_lets_it_sign_in_again_from_every_address(client, alice, settings):
    settings.DEPTHSITE_LOGIN_USER_RATE = "20/15m"
    _fail(client, "alice", 10, address=A)
    _fail(client, "alice", 10, address="192.0.2.1")
    assert _login(client, "alice", PASSWORD, address=B).status_code == 429  # the name's total is reached
    out = io.StringIO()
    call_command("signin_limits", "clear", "--user", "ALICE", stdout=out)  # the name in any case
    assert "alice" in out.getvalue().lower()
    assert _counts(user="alice", address=A)["user_address"]["attempts"] == 0
    for address in (A, "192.0.2.1", B):
        assert _login(client, "alice", PASSWORD, address=address).status_code == 302
        client.logout()
    assert _counts(address=A)["address"]["attempts"] == 10  # the addresses' own counts are left alone


def test_clearing_an_address(client, alice, settings):
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "12/15m"
    get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob-right-123")
    _fail(client, "alice", 10)
    _fail(client, "carol", 2)
    assert _login(client, "bob", "pw-bob-right-123").status_code == 429
    out = io.StringIO()
    call_command("signin_limits", "clear", "--address", A, "--json", stdout=out)
    assert json.loads(out.getvalue())["cleared"] == ["address"]
    assert _login(client, "bob", "pw-bob-right-123").status_code == 302
    client.logout()
    assert _login(client, "alice", PASSWORD).status_code == 429  # alice's count from this address is her own
    call_command("signin_limits", "clear", "--user", "alice", "--address", A, stdout=io.StringIO())
    assert _login(client, "alice", PASSWORD).status_code == 302


@pytest.mark.parametrize("argv", [
    ["show"], ["clear"], ["show", "--address", "not-an-address"], ["clear", "--user", "  "],
    ["show", "--user", "alice", "--address", "999.1.1.1"], ["clear", "--address", ""],
])
def test_the_command_refuses_bad_input_in_one_line(argv, capsys, monkeypatch):
    with pytest.raises(CommandError):
        call_command("signin_limits", *argv, stdout=io.StringIO())
    monkeypatch.setattr(connections, "close_all", lambda: None)  # manage.py's; here they hold the test's transaction
    with pytest.raises(SystemExit) as exited:
        load_command_class("inference", "signin_limits").run_from_argv(["manage.py", "signin_limits", *argv])
    out, err = capsys.readouterr()
    assert exited.value.code not in (0, None) and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    with pytest.raises(SystemExit):
        load_command_class("inference", "signin_limits").run_from_argv(["manage.py", "signin_limits", *argv, "--json"])
    out, _ = capsys.readouterr()
    assert set(json.loads(out)) == {"error"}
