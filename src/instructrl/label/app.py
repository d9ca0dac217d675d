"""The labeling web app (Flask, server-rendered pages, a small script for the ranking widget).

Pages
    ``/login``, ``/logout``            log in with username + secret; log out (POST)
    ``/``                              the labeler's queue of pending items (both kinds alternating, or one)
    ``/work``                          choose the kind of work the queue offers (POST)
    ``/task/<id>``                     one assignment: write a demonstration, or rank K responses (with the
                                       paper's metadata and a 1-7 quality score per response); skip with a
                                       reason; the same page edits submitted work
    ``/history``                       the labeler's submitted and skipped work
    ``/admin``, ``/admin/agreement``   progress and inter-labeler agreement (admin role only)

Security
    * Every page but ``/login`` needs a live session (:mod:`instructrl.label.auth`); admin pages need the
      admin role (403 otherwise). A labeler can open only their own assignments: any other id is a 404,
      whether or not it exists.
    * Every POST must carry the session's CSRF token (``csrf_token`` field), else 403. Cookies are
      HttpOnly and SameSite=Lax (``secure_cookies`` adds Secure for HTTPS deployments).
    * Templates are autoescaped, and prompts and responses are only ever inserted as text; a strict
      Content-Security-Policy (scripts from this site only, no inline scripts) backs that up.
    * Input is validated and length-limited in :mod:`instructrl.label.forms`; bodies over
      ``MAX_FORM_BYTES`` are refused with 413 (by the server before they are read, see ``label serve``).
    * Failed logins are throttled per account and per client address with exponential backoff
      (:class:`instructrl.label.auth.LoginThrottle`, 429 with ``Retry-After``).

Logs (Python logging; ``label serve`` prints them)
    ``instructrl.label.access``  one line per request: address, user, method, path (no query string), status,
                                 bytes, milliseconds; never form fields or cookies
    ``instructrl.label.events``  logins, failed and throttled logins, logouts, admin page views

Typed work is never lost to an expired login: the task pages keep a draft of every field in the browser
(``static/drafts.js``, localStorage keyed by user and assignment), restored when the page is opened again and
cleared once the server has accepted the submission; a submission that arrives after the login expired is
sent to the login page, which returns to the task with the draft in place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, abort, current_app, flash, g, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException, TooManyRequests

from instructrl.label import auth, forms, tasks
from instructrl.label.db import Assignment, Database, Labeler, app_secret_key, utcnow

ACCESS_LOG = logging.getLogger("instructrl.label.access")
EVENT_LOG = logging.getLogger("instructrl.label.events")
LETTERS = "ABCDEFGHI"
SNIPPET_CHARS = 90
LIST_LIMIT = 200
"""Rows shown on the queue and history pages (the queue is worked from the top, history is newest first)."""


@dataclasses.dataclass(frozen=True)
class AppSettings:
    session_lifetime: dt.timedelta = dt.timedelta(hours=12)
    """A login lasts at most this long."""
    session_idle: dt.timedelta = dt.timedelta(hours=2)
    """A login ends after this long without a request."""
    secure_cookies: bool = False
    """Send cookies only over HTTPS (set when serving behind TLS)."""

    @property
    def limits(self) -> auth.SessionLimits:
        return auth.SessionLimits(lifetime=self.session_lifetime, idle=self.session_idle)


@dataclasses.dataclass
class _State:
    db: Database
    settings: AppSettings
    clock: Callable[[], dt.datetime]
    throttle: auth.LoginThrottle


def _state() -> _State:
    return current_app.extensions["instructrl_label"]


def create_app(
    db: Database,
    settings: AppSettings | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
    throttle: auth.LoginThrottle | None = None,
) -> Flask:
    """The WSGI app serving the labeling database ``db`` (already migrated).

    ``clock`` returns the current UTC time; tests pass a fake one to check expiry and login backoff.
    """
    settings = settings or AppSettings()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=app_secret_key(db),
        SESSION_COOKIE_NAME="instructrl_label",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        PERMANENT_SESSION_LIFETIME=settings.session_lifetime,
        MAX_CONTENT_LENGTH=forms.MAX_FORM_BYTES,
        MAX_FORM_MEMORY_SIZE=forms.MAX_FORM_BYTES,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.extensions["instructrl_label"] = _State(db, settings, clock, throttle or auth.LoginThrottle())
    app.jinja_env.globals.update(
        letters=LETTERS, flags=forms.FLAGS, skip_reasons=forms.SKIP_REASONS, work_names=tasks.WORK_NAMES
    )
    app.before_request(_load_user_and_check_csrf)
    app.after_request(_security_headers)
    app.after_request(_log_request)
    app.register_error_handler(HTTPException, _http_error)
    _register_routes(app)
    return app


# --------------------------------------------------------------------------- request plumbing


def _load_user_and_check_csrf() -> Any:
    g.user = None
    g.started = time.perf_counter()
    if request.endpoint == "static":  # public files: no session lookup needed
        return
    state = _state()
    token = session.get("sid")
    if token:
        now = state.clock()
        with state.db.read() as s:
            g.user = auth.resolve_session(s, token, state.settings.limits, now)
        if g.user is None:
            session.pop("sid", None)
        elif g.user.needs_touch:
            with state.db.write() as s:
                auth.touch_session(s, g.user.session_id, now)
    if g.user is not None:
        g.csrf_token = g.user.csrf_token
    else:
        # Before login the token lives in the signed session cookie (it protects the login form itself).
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        g.csrf_token = session["csrf"]
    if request.method == "POST" and not auth.same_token(request.form.get("csrf_token"), g.csrf_token):
        if g.user is None and request.endpoint != "login_submit":
            # The login expired (in this tab, or in another one that noticed first). Nothing is stored, and
            # nothing is lost: the page kept a draft in the browser (drafts.js), which the task page brings
            # back after the login.
            flash("Your login has expired. Log in again: what you typed is kept in this browser and comes back.")
            task_page = re.fullmatch(r"(/task/[0-9]+)(/skip)?", request.path)
            return redirect(url_for("login", next=task_page.group(1) if task_page else None), 303)
        abort(403, "The form has expired or did not come from this site. Reload the page and try again.")
    return None


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _security_headers(response: Any) -> Any:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"
    return response


def _log_request(response: Any) -> Any:
    """The access log: one line per request (the path without its query string; no form fields, no cookies)."""
    user = g.user.username if g.get("user") is not None else "-"
    millis = (time.perf_counter() - g.started) * 1000 if "started" in g else 0.0
    ACCESS_LOG.info(
        '%s %s "%s %s" %d %s %.0fms',
        request.remote_addr or "-",
        user,
        request.method,
        request.path,
        response.status_code,
        response.calculate_content_length() or "-",
        millis,
    )
    return response


def _http_error(error: HTTPException) -> Any:
    if error.code is None or 300 <= error.code < 400:
        return error
    titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Method not allowed"}
    titles[409] = "Conflict"
    titles[413] = "Too large"
    titles[429] = "Too many attempts"
    title = titles.get(error.code, error.name)
    message = error.description if error.code in (403, 409, 413, 429) else None
    headers = {"Retry-After": str(error.retry_after)} if getattr(error, "retry_after", None) else {}
    return render_template("error.html", title=title, message=message, code=error.code), error.code, headers


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        if not g.user.is_admin:
            abort(403, "This page is for admins.")
        EVENT_LOG.info("admin %r viewed %s", g.user.username, request.path)
        return view(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- page models


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _form_values(assignment: Assignment, form: Any | None) -> dict[str, Any]:
    """What the form fields show: the submitted values after an error, the saved label, or defaults."""
    item = assignment.item
    k = len(item.responses)
    if form is not None:
        return {
            "response": form.get("response", "")[: forms.MAX_DEMONSTRATION_CHARS],
            "ranks": {p: _int_or_none(form.get(f"rank_{p}")) for p in range(k)},
            "quality": {p: _int_or_none(form.get(f"quality_{p}")) for p in range(k)},
            "flags": {p: set(form.getlist(f"flag_{p}")) & set(forms.FLAGS) for p in range(k)},
            "confirm_all_tied": form.get("confirm_all_tied") == "1",
        }
    label = assignment.label
    if label is not None:
        ratings = {r.position: r for r in label.ratings}
        return {
            "response": label.response or "",
            "ranks": dict(enumerate(forms.ranking_to_ranks(label.ranking, k))) if label.ranking else {},
            "quality": {p: r.quality for p, r in ratings.items()},
            "flags": {p: {f for f in forms.FLAGS if getattr(r, f)} for p, r in ratings.items()},
            "confirm_all_tied": label.ranking is not None and len(label.ranking) == 1,
        }
    order = assignment.display_order or list(range(k))
    ranks = {p: i + 1 for i, p in enumerate(order)}
    return {"response": "", "ranks": ranks, "quality": {}, "flags": {}, "confirm_all_tied": False}


def _int_or_none(value: Any) -> int | None:
    """A submitted number to show again after a validation error (None when it is not one)."""
    try:
        return forms.parse_small_int(value)
    except ValueError:
        return None


def _ranking_rows(assignment: Assignment, ranks: dict[int, int | None]) -> list[dict[str, Any]]:
    """Rows of the ranking widget: positions sorted by rank (display order breaks ties), tie flags set."""
    order = assignment.display_order or list(range(len(assignment.item.responses)))
    letter_of = {p: LETTERS[i] for i, p in enumerate(order)}
    big = len(order) + 1
    sorted_positions = sorted(order, key=lambda p: (ranks.get(p) or big, order.index(p)))
    rows = []
    for i, p in enumerate(sorted_positions):
        tied = i > 0 and ranks.get(p) is not None and ranks.get(p) == ranks.get(sorted_positions[i - 1])
        text = assignment.item.responses[p].text
        rows.append({"position": p, "letter": letter_of[p], "snippet": _snippet(text), "tied": tied})
    return rows


def _render_task(
    assignment: Assignment,
    form: Any | None = None,
    errors: dict[str, str] | None = None,
    conflict: str | None = None,
    status: int = 200,
    skip_form: Any | None = None,
) -> Any:
    """The task page; after an error ``form`` (the label form) or ``skip_form`` holds the values to show again."""
    item = assignment.item
    values = _form_values(assignment, form)
    skip = {"reason": assignment.skip_reason, "note": assignment.skip_note or ""}
    if skip_form is not None:
        skip = {"reason": skip_form.get("reason"), "note": str(skip_form.get("note", ""))[: forms.MAX_NOTE_CHARS]}
    key = form.get("submission_key") if form is not None else None
    if not (isinstance(key, str) and forms.SUBMISSION_KEY.match(key)) or conflict:
        key = uuid.uuid4().hex
    context: dict[str, Any] = {
        "assignment": assignment,
        "item": item,
        "prompt": item.prompt.text,
        "values": values,
        "errors": errors or {},
        "conflict": conflict,
        "submission_key": key,
        "version": assignment.label.version if assignment.label is not None else None,
        "skip": skip,
        "draft_key": _draft_key(assignment.id),
    }
    if item.kind == "demonstration":
        context["max_chars"] = forms.MAX_DEMONSTRATION_CHARS
        return render_template("demonstration.html", **context), status
    order = assignment.display_order or list(range(len(item.responses)))
    context["k"] = len(order)
    context["shown"] = [
        {"position": p, "letter": LETTERS[i], "text": item.responses[p].text} for i, p in enumerate(order)
    ]
    context["ranking_rows"] = _ranking_rows(assignment, values["ranks"])
    return render_template("comparison.html", **context), status


def _draft_key(assignment_id: int) -> str:
    """Where the browser keeps the drafts of one labeler's task page (see static/drafts.js)."""
    return f"{g.user.username}:{assignment_id}"


def _owned_assignment_or_404(s: Any, assignment_id: int) -> Assignment:
    """The logged-in labeler's assignment ``assignment_id``; any other id is a 404, whether or not it exists."""
    assignment = tasks.owned_assignment(s, g.user.labeler_id, assignment_id)
    if assignment is None:
        abort(404)
    return assignment


def _render_work_list(template: str, name: str, rows: Callable[..., Any], **context: Any) -> Any:
    """The queue or history page: ``rows(session, labeler_id, limit=)`` as ``name``, with the status counts."""
    labeler_id = g.user.labeler_id
    with _state().db.read() as s:
        context[name] = rows(s, labeler_id, limit=LIST_LIMIT)
        return render_template(template, **context, counts=tasks.status_counts(s, labeler_id), snippet=_snippet)


def _render_stats(template: str) -> Any:
    """An admin page over the labeling statistics."""
    from instructrl.label.stats import collect_stats

    with _state().db.read() as s:
        return render_template(template, stats=collect_stats(s))


def _act_on_task(assignment_id: int, act: Callable[[Any, Assignment], str], posted: str) -> Any:
    """Apply ``act(session, assignment)`` to the labeler's assignment in one write transaction, then flash the
    message it returns and go to the next pending item.

    ``act`` raises :class:`forms.FormError` or :class:`tasks.Conflict` before it writes anything; the task page
    is then shown again (400 or 409) with the submitted values in the form that was ``posted`` ("label" or
    "skip").
    """
    with _state().db.write() as s:
        assignment = _owned_assignment_or_404(s, assignment_id)
        try:
            message = act(s, assignment)
        except forms.FormError as e:
            submitted = {"form": request.form} if posted == "label" else {"skip_form": request.form}
            return _render_task(assignment, errors=e.errors, status=400, **submitted)
        except tasks.Conflict as e:
            return _render_task(assignment, conflict=str(e), status=409)
    flash(_draft_key(assignment_id), "stored")  # the next page tells the browser to drop this page's drafts
    return _after_submit(g.user.labeler_id, message)


def _after_submit(labeler_id: int, message: str) -> Any:
    flash(message)
    with _state().db.read() as s:
        next_id = tasks.next_pending(s, labeler_id, g.user.work)
    if next_id is None:
        return redirect(url_for("queue"), 303)
    return redirect(url_for("task", assignment_id=next_id), 303)


# --------------------------------------------------------------------------- routes


def _register_routes(app: Flask) -> None:  # noqa: C901 - one place that lists every route
    @app.get("/favicon.ico")
    def favicon() -> Any:
        return "", 204

    @app.get("/login")
    def login() -> Any:
        if g.user is not None:
            return redirect(url_for("admin" if g.user.is_admin else "queue"))
        return render_template("login.html", next=forms.safe_next_url(request.args.get("next")), errors={})

    @app.post("/login")
    def login_submit() -> Any:
        state = _state()
        next_url = forms.safe_next_url(request.form.get("next"))
        try:
            username, secret = forms.parse_login(request.form)
        except forms.FormError as e:
            return render_template("login.html", next=next_url, errors=e.errors), 400
        now = state.clock()
        address = request.remote_addr or "-"
        account = ("account", auth.normalize_username(username))
        keys = [account, ("address", address)]
        wait = state.throttle.retry_after(keys, now)
        if wait > dt.timedelta(0):
            seconds = max(1, round(wait.total_seconds()))
            EVENT_LOG.warning("throttled login for %r from %s (%d s left)", username, address, seconds)
            raise TooManyRequests(
                f"Too many failed logins for this account or from this address. Try again in {seconds} seconds.",
                retry_after=seconds,
            )
        with state.db.write() as s:
            labeler = auth.authenticate(s, username, secret, now)
            if labeler is None:
                state.throttle.failed(keys, now)
                EVENT_LOG.warning("failed login for %r from %s", username, address)
                errors = {"login": "Unknown username, or wrong or expired secret."}
                return render_template("login.html", next=next_url, errors=errors, username=username), 401
            token, _csrf = auth.start_session(s, labeler, state.settings.limits, now)
            is_admin = labeler.is_admin
        state.throttle.succeeded(account)
        EVENT_LOG.info("login %r from %s", username, address)
        session.clear()  # a fresh cookie on login: no session fixation
        session["sid"] = token
        session.permanent = True
        return redirect(next_url or url_for("admin" if is_admin else "queue"), 303)

    @app.post("/logout")
    def logout() -> Any:
        if g.user is not None:
            EVENT_LOG.info("logout %r", g.user.username)
        with _state().db.write() as s:
            auth.end_session(s, session.get("sid"))
        session.clear()
        return redirect(url_for("login"), 303)

    @app.get("/")
    @login_required
    def queue() -> Any:
        kind = g.user.work
        return _render_work_list("queue.html", "pending", functools.partial(tasks.queue_for, kind=kind), work=kind)

    @app.post("/work")
    @login_required
    def choose_work() -> Any:
        kind = request.form.get("work")
        if kind not in tasks.WORK_NAMES:
            abort(400)
        with _state().db.write() as s:
            s.get(Labeler, g.user.labeler_id).work = kind
        return redirect(url_for("queue"), 303)

    @app.get("/history")
    @login_required
    def history() -> Any:
        return _render_work_list("history.html", "assignments", tasks.history_for)

    @app.get("/task/<int:assignment_id>")
    @login_required
    def task(assignment_id: int) -> Any:
        with _state().db.read() as s:
            assignment = _owned_assignment_or_404(s, assignment_id)
            return _render_task(assignment)

    @app.post("/task/<int:assignment_id>")
    @login_required
    def submit_task(assignment_id: int) -> Any:
        def submit(s: Any, assignment: Assignment) -> str:
            meta = forms.parse_submission_meta(request.form)
            if assignment.item.kind == "demonstration":
                outcome = tasks.submit_demonstration(s, assignment, forms.parse_demonstration(request.form), meta)
            else:
                data = forms.parse_ranking(request.form, len(assignment.item.responses))
                outcome = tasks.submit_ranking(s, assignment, data, meta)
            return {"created": "Submitted.", "updated": "Changes saved.", "unchanged": "Already submitted."}[outcome]

        return _act_on_task(assignment_id, submit, posted="label")

    @app.post("/task/<int:assignment_id>/skip")
    @login_required
    def skip_task(assignment_id: int) -> Any:
        def skip(s: Any, assignment: Assignment) -> str:
            reason, note = forms.parse_skip(request.form)
            tasks.skip_assignment(s, assignment, reason, note)
            return "Skipped."

        return _act_on_task(assignment_id, skip, posted="skip")

    @app.get("/admin")
    @admin_required
    def admin() -> Any:
        return _render_stats("admin.html")

    @app.get("/admin/agreement")
    @admin_required
    def admin_agreement() -> Any:
        return _render_stats("agreement.html")
