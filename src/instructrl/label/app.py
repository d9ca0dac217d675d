"""The labeling web app (Flask, server-rendered pages, a small script for the ranking widget).

Pages
    ``/login``, ``/logout``            log in with username + secret; log out (POST)
    ``/``                              the labeler's queue of pending items
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
      ``MAX_FORM_BYTES`` are refused with 413.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, abort, current_app, flash, g, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from instructrl.label import auth, forms, tasks
from instructrl.label.db import Assignment, Database, app_secret_key, utcnow

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


def _state() -> _State:
    return current_app.extensions["instructrl_label"]


def create_app(db: Database, settings: AppSettings | None = None, clock: Callable[[], dt.datetime] = utcnow) -> Flask:
    """The WSGI app serving the labeling database ``db`` (already migrated).

    ``clock`` returns the current UTC time; tests pass a fake one to check expiry.
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
    app.extensions["instructrl_label"] = _State(db, settings, clock)
    app.jinja_env.globals.update(letters=LETTERS, flags=forms.FLAGS, skip_reasons=forms.SKIP_REASONS)
    app.before_request(_load_user_and_check_csrf)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    _register_routes(app)
    return app


# --------------------------------------------------------------------------- request plumbing


def _load_user_and_check_csrf() -> None:
    g.user = None
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
            g.session_expired = True
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
        if g.get("session_expired"):
            abort(403, "Your login has expired. Log in again; your browser's Back button brings back what you typed.")
        abort(403, "The form has expired or did not come from this site. Reload the page and try again.")


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


def _http_error(error: HTTPException) -> Any:
    if error.code is None or 300 <= error.code < 400:
        return error
    titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Method not allowed"}
    titles[409] = "Conflict"
    titles[413] = "Too large"
    title = titles.get(error.code, error.name)
    message = error.description if error.code in (403, 409, 413) else None
    return render_template("error.html", title=title, message=message, code=error.code), error.code


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
        }
    label = assignment.label
    if label is not None:
        ratings = {r.position: r for r in label.ratings}
        return {
            "response": label.response or "",
            "ranks": dict(enumerate(forms.ranking_to_ranks(label.ranking, k))) if label.ranking else {},
            "quality": {p: r.quality for p, r in ratings.items()},
            "flags": {p: {f for f in forms.FLAGS if getattr(r, f)} for p, r in ratings.items()},
        }
    order = assignment.display_order or list(range(k))
    return {"response": "", "ranks": {p: i + 1 for i, p in enumerate(order)}, "quality": {}, "flags": {}}


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
) -> Any:
    item = assignment.item
    values = _form_values(assignment, form)
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


def _owned_assignment_or_404(s: Any, assignment_id: int) -> Assignment:
    """The logged-in labeler's assignment ``assignment_id``; any other id is a 404, whether or not it exists."""
    assignment = tasks.owned_assignment(s, g.user.labeler_id, assignment_id)
    if assignment is None:
        abort(404)
    return assignment


def _render_work_list(template: str, name: str, rows: Callable[..., Any]) -> Any:
    """The queue or history page: ``rows(session, labeler_id, limit=)`` as ``name``, with the status counts."""
    labeler_id = g.user.labeler_id
    with _state().db.read() as s:
        listing = {name: rows(s, labeler_id, limit=LIST_LIMIT)}
        return render_template(template, **listing, counts=tasks.status_counts(s, labeler_id), snippet=_snippet)


def _render_stats(template: str) -> Any:
    """An admin page over the labeling statistics."""
    from instructrl.label.stats import collect_stats

    with _state().db.read() as s:
        return render_template(template, stats=collect_stats(s))


def _act_on_task(assignment_id: int, act: Callable[[Any, Assignment], str], show_form_again: bool) -> Any:
    """Apply ``act(session, assignment)`` to the labeler's assignment in one write transaction, then flash the
    message it returns and go to the next pending item.

    ``act`` raises :class:`forms.FormError` or :class:`tasks.Conflict` before it writes anything; the task page
    is then shown again (400 or 409), with the submitted values when ``show_form_again``.
    """
    with _state().db.write() as s:
        assignment = _owned_assignment_or_404(s, assignment_id)
        try:
            message = act(s, assignment)
        except forms.FormError as e:
            form = request.form if show_form_again else None
            return _render_task(assignment, form=form, errors=e.errors, status=400)
        except tasks.Conflict as e:
            return _render_task(assignment, conflict=str(e), status=409)
    return _after_submit(g.user.labeler_id, message)


def _after_submit(labeler_id: int, message: str) -> Any:
    flash(message)
    with _state().db.read() as s:
        next_id = tasks.next_pending(s, labeler_id)
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
            return redirect(url_for("queue"))
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
        with state.db.write() as s:
            labeler = auth.authenticate(s, username, secret, now)
            if labeler is None:
                errors = {"login": "Unknown username, or wrong or expired secret."}
                return render_template("login.html", next=next_url, errors=errors, username=username), 401
            token, _csrf = auth.start_session(s, labeler, state.settings.limits, now)
        session.clear()  # a fresh cookie on login: no session fixation
        session["sid"] = token
        session.permanent = True
        return redirect(next_url or url_for("queue"), 303)

    @app.post("/logout")
    def logout() -> Any:
        with _state().db.write() as s:
            auth.end_session(s, session.get("sid"))
        session.clear()
        return redirect(url_for("login"), 303)

    @app.get("/")
    @login_required
    def queue() -> Any:
        return _render_work_list("queue.html", "pending", tasks.queue_for)

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

        return _act_on_task(assignment_id, submit, show_form_again=True)

    @app.post("/task/<int:assignment_id>/skip")
    @login_required
    def skip_task(assignment_id: int) -> Any:
        def skip(s: Any, assignment: Assignment) -> str:
            reason, note = forms.parse_skip(request.form)
            tasks.skip_assignment(s, assignment, reason, note)
            return "Skipped."

        # the skip form's fields are not the task form's: after an error the task form shows the saved label
        return _act_on_task(assignment_id, skip, show_form_again=False)

    @app.get("/admin")
    @admin_required
    def admin() -> Any:
        return _render_stats("admin.html")

    @app.get("/admin/agreement")
    @admin_required
    def admin_agreement() -> Any:
        return _render_stats("agreement.html")
