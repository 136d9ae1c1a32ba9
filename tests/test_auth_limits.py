"""Password guessing and reset e-mails are limited (depthsite.auth_limits): failed sign-ins per user name and per
client address at /accounts/login/ and /admin/login/, reset requests per e-mail address and per client address."""
from __future__ import annotations

import re
import time

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.core import mail
from django.core.cache import cache

pytestmark = pytest.mark.django_db

LOGIN, ADMIN_LOGIN, RESET = "/accounts/login/", "/admin/login/", "/accounts/password_reset/"
PASSWORD = "pw-alice-right-123"
REFUSED = "Too many failed sign-in attempts"


@pytest.fixture(autouse=True)
def _fresh_counts(settings):
    """The counts live in the default cache, which outlives a test; the rates are the documented defaults."""
    settings.DEPTHSITE_LOGIN_RATE = "10/15m"
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "30/15m"
    settings.DEPTHSITE_PASSWORD_RESET_RATE = "5/hour"
    settings.DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE = "5/hour"
    settings.DEPTHSITE_TRUSTED_PROXIES = 0
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", "alice@example.com", PASSWORD)


@pytest.fixture
def clock(monkeypatch):
    """time.time() moved on by `clock.skip(seconds)` (the counts and the cache's expiry both read it)."""
    real = time.time

    class Clock:
        offset = 0.0

        def skip(self, seconds: float) -> None:
            self.offset += seconds

    moved = Clock()
    monkeypatch.setattr(time, "time", lambda: real() + moved.offset)
    return moved


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
    # Another address may sign in as bob, but not as alice, whose name is over its limit wherever it comes from.
    assert _login(client, "bob", "pw-bob-right-123", address="198.51.100.9").status_code == 302
    client.logout()
    assert _login(client, "alice", PASSWORD, address="198.51.100.9").status_code == 429


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


def test_a_post_without_a_password_checks_nothing_and_clears_nothing(client, alice):
    _fail(client, "alice", 10)
    response = client.post(LOGIN, {"username": "alice", "password": ""}, REMOTE_ADDR="203.0.113.7")
    assert response.status_code == 429
    client.post(LOGIN, {"username": "alice"}, REMOTE_ADDR="198.51.100.9")
    assert _login(client, "alice", PASSWORD, address="198.51.100.9").status_code == 429


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


def test_the_window_slides_from_the_oldest_failure(client, alice, clock):
    _fail(client, "alice", 5)
    clock.skip(10 * 60)
    _fail(client, "alice", 5)
    assert _login(client, "alice", PASSWORD).status_code == 429
    clock.skip(5 * 60 + 1)  # the first five have left the window: five of ten remain
    assert _login(client, "alice", PASSWORD).status_code == 302


def test_a_limit_can_be_turned_off(client, alice, settings):
    settings.DEPTHSITE_LOGIN_RATE = "off"
    settings.DEPTHSITE_LOGIN_ADDRESS_RATE = "off"
    _fail(client, "alice", 40)
    assert _login(client, "alice", PASSWORD).status_code == 302


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
