"""Labeler accounts, secrets and browser sessions.

* A labeler logs in with a username and a secret. ``label create-labeler`` generates the secret (or takes
  one), shows it once and stores only its salted scrypt hash (Werkzeug's ``generate_password_hash``).
  A secret expires after ``secret_days``; ``--set rotate=true`` issues a new one.
* A login creates a server-side :class:`~instructrl.label.db.LoginSession`: the browser's cookie holds a
  random 256-bit token, the database only its SHA-256 (a stolen database does not give live sessions).
  A session ends at ``expires_at`` (absolute lifetime), after ``idle`` time without a request, on logout,
  or when the labeler is deactivated or given a new secret.
* Each session has its own CSRF token, which every form must echo back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hmac
import re
import secrets
import threading

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from instructrl.errors import UserFacingError
from instructrl.label.db import ROLES, WORK_KINDS, Labeler, LoginSession, sha256_hex, utcnow

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,63}$")
"""Usernames: 2-64 characters, lower-case letters, digits, '_', '.', '-', starting with a letter or digit."""
MIN_SECRET_CHARS = 12
MAX_SECRET_CHARS = 256
SECRET_HASH_METHOD = "scrypt:32768:8:1"
"""Werkzeug hash method for stored secrets (its default: scrypt, N = 2^15, r = 8, p = 1; about 0.1 s per check).
A stored hash records its own parameters, so raising them later still verifies older secrets."""
LAST_SEEN_RESOLUTION = dt.timedelta(seconds=60)
"""``last_seen_at`` is refreshed at most this often, so reading a page rarely needs a write."""


@functools.cache
def _dummy_hash() -> str:
    """A fixed hash to check against when the username is unknown, so that a failed login takes the same
    time whether or not the user exists (no username enumeration by timing)."""
    return generate_password_hash("instructrl-no-such-user", method=SECRET_HASH_METHOD)


def normalize_username(username: str) -> str:
    return username.strip().lower()


def check_username(username: str) -> str:
    """The normalized username, or a :class:`UserFacingError` explaining the rule."""
    name = normalize_username(username)
    if not USERNAME_PATTERN.match(name):
        raise UserFacingError(
            f"invalid username {username!r}: use 2-64 characters: lower-case letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def new_secret() -> str:
    """A fresh random login secret (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


@dataclasses.dataclass(frozen=True)
class CreatedLabeler:
    username: str
    role: str
    secret: str | None
    """The new secret in clear text (shown once); None when the secret was not changed."""
    created: bool
    active: bool
    secret_expires_at: dt.datetime | None
    work: str


def create_or_update_labeler(
    session: Session,
    username: str,
    *,
    role: str | None = None,
    secret: str | None = None,
    secret_days: int = 90,
    rotate: bool = False,
    active: bool | None = None,
    work: str | None = None,
    now: dt.datetime | None = None,
) -> CreatedLabeler:
    """Create a labeler, or update an existing one's role / active flag (and secret when ``rotate``).

    ``role``, ``active`` and ``work`` left as None mean 'labeler', active and mixed work for a new account,
    and unchanged for an existing one. A new labeler always gets a secret (``secret`` or a generated one).
    Changing an existing labeler's secret needs ``rotate=True``, so re-running a create command cannot silently
    lock someone out. A new secret, a role change or deactivation end the labeler's open sessions.
    """
    now = now or utcnow()
    name = check_username(username)
    if role is not None and role not in ROLES:
        raise UserFacingError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if work is not None and work not in WORK_KINDS:
        raise UserFacingError(f"work must be one of {', '.join(WORK_KINDS)}, got {work!r}")
    if secret is not None and not (MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS):
        raise UserFacingError(f"a secret needs {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters")
    expires = now + dt.timedelta(days=secret_days) if secret_days > 0 else None
    labeler = session.scalar(select(Labeler).where(Labeler.username == name))
    created = labeler is None
    clear_secret = None
    if labeler is None:
        clear_secret = secret or new_secret()
        labeler = Labeler(
            username=name,
            role=role or "labeler",
            secret_hash=generate_password_hash(clear_secret, method=SECRET_HASH_METHOD),
            secret_expires_at=expires,
            active=True if active is None else active,
            created_at=now,
            work=work or "mixed",
        )
        session.add(labeler)
    else:
        if secret is not None and not rotate:
            raise UserFacingError(f"labeler {name!r} exists; add --set rotate=true to replace the secret")
        role = labeler.role if role is None else role
        active = labeler.active if active is None else active
        end_sessions = labeler.role != role or labeler.active != active
        if rotate:
            clear_secret = secret or new_secret()
            labeler.secret_hash = generate_password_hash(clear_secret, method=SECRET_HASH_METHOD)
            labeler.secret_expires_at = expires
            end_sessions = True
        labeler.role, labeler.active = role, active
        labeler.work = labeler.work if work is None else work
        if end_sessions:
            session.execute(delete(LoginSession).where(LoginSession.labeler_id == labeler.id))
    session.flush()
    return CreatedLabeler(
        name, labeler.role, clear_secret, created, labeler.active, labeler.secret_expires_at, labeler.work
    )


def authenticate(session: Session, username: str, secret: str, now: dt.datetime | None = None) -> Labeler | None:
    """The active labeler with this username and an unexpired matching secret, else None."""
    now = now or utcnow()
    labeler = session.scalar(select(Labeler).where(Labeler.username == normalize_username(username)))
    if labeler is None:
        check_password_hash(_dummy_hash(), secret)
        return None
    if not check_password_hash(labeler.secret_hash, secret):
        return None
    if not labeler.active:
        return None
    if labeler.secret_expires_at is not None and labeler.secret_expires_at <= now:
        return None
    return labeler


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    lifetime: dt.timedelta = dt.timedelta(hours=12)
    """A session ends this long after login, however active."""
    idle: dt.timedelta = dt.timedelta(hours=2)
    """A session ends after this long without a request."""


def start_session(
    session: Session, labeler: Labeler, limits: SessionLimits, now: dt.datetime | None = None
) -> tuple[str, str]:
    """Open a login session for ``labeler``; returns ``(cookie_token, csrf_token)``."""
    now = now or utcnow()
    # drop this labeler's expired sessions so the table does not grow without bound
    session.execute(delete(LoginSession).where(LoginSession.labeler_id == labeler.id, LoginSession.expires_at <= now))
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(
        LoginSession(
            token_hash=sha256_hex(token),
            labeler_id=labeler.id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + limits.lifetime,
            last_seen_at=now,
        )
    )
    session.flush()
    return token, csrf


@dataclasses.dataclass(frozen=True)
class CurrentUser:
    """The logged-in labeler as the web app sees it (plain values, usable after the DB session closes)."""

    labeler_id: int
    username: str
    role: str
    csrf_token: str
    session_id: int
    needs_touch: bool
    """Whether ``last_seen_at`` is stale enough to be refreshed."""
    work: str = "mixed"
    """The kind of work the labeler's queue offers (``Labeler.work``)."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def resolve_session(
    session: Session, token: str | None, limits: SessionLimits, now: dt.datetime | None = None
) -> CurrentUser | None:
    """The user of a live session with cookie ``token``, or None (unknown, expired, idle, deactivated)."""
    if not token or len(token) > 128:
        return None
    now = now or utcnow()
    row = session.scalar(select(LoginSession).where(LoginSession.token_hash == sha256_hex(token)))
    if row is None or row.expires_at <= now or row.last_seen_at + limits.idle <= now:
        return None
    labeler = row.labeler
    if not labeler.active or (labeler.secret_expires_at is not None and labeler.secret_expires_at <= now):
        return None
    return CurrentUser(
        labeler_id=labeler.id,
        username=labeler.username,
        role=labeler.role,
        csrf_token=row.csrf_token,
        session_id=row.id,
        needs_touch=now - row.last_seen_at >= LAST_SEEN_RESOLUTION,
        work=labeler.work,
    )


def touch_session(session: Session, session_id: int, now: dt.datetime | None = None) -> None:
    row = session.get(LoginSession, session_id)
    if row is not None:
        row.last_seen_at = now or utcnow()


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(LoginSession).where(LoginSession.token_hash == sha256_hex(token)))


class LoginThrottle:
    """Failed-login counting with exponential backoff, per account and per client address (in memory).

    Each key (``("account", username)`` or ``("address", ip)``) may fail ``free_*_failures`` times in a row;
    after the (free + n)-th failure, n = 0, 1, ..., logins for the key are refused for ``base_delay · 2^n``,
    capped at ``max_delay``. Refused attempts are not checked and not counted; a success clears the account's count.
    A key's count is forgotten ``max_delay`` after its last failure. The address allowance is larger because
    several people may share one address (an office, a proxy).
    """

    def __init__(
        self,
        free_account_failures: int = 5,
        free_address_failures: int = 20,
        base_delay: dt.timedelta = dt.timedelta(seconds=2),
        max_delay: dt.timedelta = dt.timedelta(minutes=15),
    ):
        self.free = {"account": free_account_failures, "address": free_address_failures}
        self.base_delay, self.max_delay = base_delay, max_delay
        self._failures: dict[tuple[str, str], tuple[int, dt.datetime]] = {}
        self._lock = threading.Lock()

    def _delay(self, key: tuple[str, str], count: int) -> dt.timedelta:
        over = count - self.free[key[0]]  # failures beyond the allowance, minus one
        if over < 0:
            return dt.timedelta(0)
        return min(self.base_delay * 2 ** min(over, 30), self.max_delay)

    def retry_after(self, keys: list[tuple[str, str]], now: dt.datetime) -> dt.timedelta:
        """How long logins for any of ``keys`` must still wait (zero when they may try now)."""
        wait = dt.timedelta(0)
        with self._lock:
            for key in keys:
                count, last = self._failures.get(key, (0, now))
                wait = max(wait, last + self._delay(key, count) - now)
        return wait

    def failed(self, keys: list[tuple[str, str]], now: dt.datetime) -> None:
        with self._lock:
            if len(self._failures) > 100_000:  # forget stale keys so a flood of addresses cannot fill memory
                stale = [k for k, (_, last) in self._failures.items() if now - last > self.max_delay]
                for key in stale:
                    del self._failures[key]
            for key in keys:
                count, last = self._failures.get(key, (0, now))
                self._failures[key] = (1 if now - last > self.max_delay else count + 1, now)

    def succeeded(self, account: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(account, None)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
