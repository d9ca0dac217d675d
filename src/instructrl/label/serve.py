"""``instructrl label serve``: run the labeling web app on a labeling database.

Typical session (every command takes ``--set db=FILE.sqlite``, or ``--db FILE.sqlite``)::

    instructrl label create-labeler --db l.sqlite --set username=admin --set role=admin
    instructrl label create-labeler --db l.sqlite --set username=alice
    instructrl label load-prompts --db l.sqlite --set prompts=runs/demo/prepared/train.jsonl
    instructrl label load-prompts --db l.sqlite --set prompts=runs/demo/prepared/valid.jsonl --set task=comparison
    instructrl label add-samples --db l.sqlite --set model=runs/demo/sft --set k=4
    instructrl label assign --db l.sqlite --set overlap_fraction=0.1
    instructrl label serve --db l.sqlite --set port=8000
    instructrl label export --db l.sqlite --set kind=comparisons --set output=comparisons.jsonl
    instructrl rm --set comparisons=comparisons.jsonl

The app is served by Waitress (a multi-threaded production WSGI server). It listens on 127.0.0.1 by
default; to serve labelers on other machines put it behind an HTTPS reverse proxy, set ``host`` and
``secure_cookies=true``. Stop it with Ctrl-C; every submission is committed when its page is answered.
The database must exist (a mistyped ``--db`` would otherwise serve a new, empty one) unless ``create=true``.
Waitress refuses a request body over the app's form limit from its Content-Length, before reading it.

Logs go to standard error: logins, failed and throttled logins and admin page views, and (unless
``access_log=false``) one line per request (see :mod:`instructrl.label.app`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import signal
import threading
from typing import Any

from instructrl.config import require, require_non_negative, require_positive
from instructrl.label.app import AppSettings, create_app
from instructrl.label.db import open_database
from instructrl.label.forms import MAX_FORM_BYTES


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl label serve``."""

    db: str
    """Labeling database file (SQLite; must exist unless create=true)."""
    create: bool = False
    """Create the database when it does not exist (otherwise a missing file is an error)."""
    host: str = "127.0.0.1"
    """Interface to listen on ('0.0.0.0' = every interface; use HTTPS in front of it)."""
    port: int = 8000
    """TCP port (0 = any free port; the chosen one is printed)."""
    threads: int = 8
    """Requests served in parallel."""
    session_hours: float = 12.0
    """A login lasts at most this many hours."""
    idle_minutes: float = 120.0
    """A login ends after this many minutes without a request."""
    secure_cookies: bool = False
    """Send the session cookie over HTTPS only (set when served behind TLS)."""
    access_log: bool = True
    """Log one line per request to standard error (address, user, method, path, status; no form data)."""

    def validate(self) -> None:
        require_non_negative(self, "port")
        require(self.port <= 65535, "port", f"must be <= 65535, got {self.port}")
        require_positive(self, "threads", "session_hours", "idle_minutes")


def app_settings(cfg: Config) -> AppSettings:
    return AppSettings(
        session_lifetime=dt.timedelta(hours=cfg.session_hours),
        session_idle=dt.timedelta(minutes=cfg.idle_minutes),
        secure_cookies=cfg.secure_cookies,
    )


def _raise_keyboard_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> Any:
    """Treat SIGTERM (service managers, ``kill``) like Ctrl-C so the server shuts down cleanly."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _log_to_stderr(access_log: bool) -> None:
    """Print the app's logs (``instructrl.label.*``) to standard error, once per process."""
    logger = logging.getLogger("instructrl.label")
    if not any(getattr(h, "instructrl_label", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        handler.instructrl_label = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.getLogger("instructrl.label.access").setLevel(logging.INFO if access_log else logging.WARNING)


def run(cfg: Config) -> dict[str, Any]:
    from waitress.server import create_server

    _log_to_stderr(cfg.access_log)
    with open_database(cfg.db, must_exist=not cfg.create) as db:
        app = create_app(db, app_settings(cfg))
        server = create_server(
            app,
            host=cfg.host,
            port=cfg.port,
            threads=cfg.threads,
            ident="instructrl-label",
            max_request_body_size=MAX_FORM_BYTES,  # refused from the Content-Length, before the body is read
        )
        # a host name with several addresses gives a multi-socket server, which reports no single port
        url = f"http://{cfg.host}:{getattr(server, 'effective_port', cfg.port)}/"
        print(f"label serve: serving {cfg.db} at {url} (Ctrl-C to stop)", flush=True)
        previous = _stop_on_sigterm()
        try:
            server.run()  # returns after Ctrl-C (or SIGTERM, see below)
        finally:
            server.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    print("label serve: stopped", flush=True)
    return {"url": url}
