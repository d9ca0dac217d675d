"""The labeling web app: every route, permission and validation rule, sessions, CSRF, escaping, idempotency,
parallel submissions over a real server, and export consistency while labeling goes on."""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.cookiejar
import logging
import random
import re
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select
from werkzeug.security import generate_password_hash

from conftest import assignment_outcome, label_serve_process
from instructrl.data.records import PromptRecord
from instructrl.label import auth, forms
from instructrl.label.app import AppSettings, create_app
from instructrl.label.auth import create_or_update_labeler
from instructrl.label.db import (
    Assignment,
    Item,
    Label,
    Labeler,
    LoginSession,
    Prompt,
    ResponseRating,
    open_database,
    utcnow,
)
from instructrl.label.export import comparison_records
from instructrl.label.tasks import add_assignment, add_comparison_item, add_prompts

SECRETS = {"alice": "alice-secret-123", "bob": "bob-secret-1234", "boss": "boss-secret-123"}
DEMO_PROMPT = "Write a poem about <b>cats</b> & dogs"
COMPARE_PROMPT = "Pick the best <script>alert('prompt')</script>"
EVIL_RESPONSE = '<img src=x onerror="alert(1)">'
RESPONSES = [EVIL_RESPONSE, "second answer", "third answer", "fourth answer"]


@dataclasses.dataclass
class World:
    path: Path
    ids: dict[str, int]
    """Assignment ids: demo_alice, demo_bob, cmp_alice (shared item), cmp_bob (shared item), cmp2_alice."""


def _build_world(path: Path) -> dict[str, int]:
    with open_database(path) as db, db.write() as s:
        people = {}
        for name, secret in SECRETS.items():
            create_or_update_labeler(s, name, role="admin" if name == "boss" else "labeler", secret=secret)
            people[name] = s.scalar(select(Labeler).where(Labeler.username == name))
        add_prompts(s, [PromptRecord(DEMO_PROMPT), PromptRecord("Second demo prompt")], "demonstration")
        add_prompts(s, [PromptRecord(COMPARE_PROMPT), PromptRecord("Another comparison")], "comparison")
        demo1, demo2 = s.scalars(select(Item).where(Item.kind == "demonstration").order_by(Item.id)).all()
        cmp_ids = s.scalars(select(Prompt.id).where(Prompt.task == "comparison").order_by(Prompt.id)).all()
        shared = add_comparison_item(s, cmp_ids[0], RESPONSES, ["model-a"] * 4)
        second = add_comparison_item(s, cmp_ids[1], ["x", "y", "z", "w", "v"], None)
        rng = random.Random(0)
        ids = {
            "demo_alice": add_assignment(s, demo1, people["alice"], rng),
            "demo_bob": add_assignment(s, demo2, people["bob"], rng),
            "cmp_alice": add_assignment(s, shared, people["alice"], rng),
            "cmp_bob": add_assignment(s, shared, people["bob"], rng),
            "cmp2_alice": add_assignment(s, second, people["alice"], rng),
        }
        s.flush()
        return {name: a.id for name, a in ids.items()}


CHEAP_HASH = "scrypt:1024:8:1"
"""Secrets hashed with a small scrypt cost in these tests (the stored hash names its parameters, so login
verifies it just the same); production uses ``auth.SECRET_HASH_METHOD`` (N = 2^15, 0.1 s per check)."""


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch):
    monkeypatch.setattr(auth, "SECRET_HASH_METHOD", CHEAP_HASH)


@pytest.fixture(scope="module")
def template_world(tmp_path_factory):
    path = tmp_path_factory.mktemp("label_template") / "world.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auth, "SECRET_HASH_METHOD", CHEAP_HASH)
        return path, _build_world(path)


@pytest.fixture
def world(tmp_path, template_world):
    """A fresh copy of the template database (building it costs a few password hashes, so it is shared)."""
    source, ids = template_world
    path = tmp_path / "world.sqlite"
    shutil.copy(source, path)  # closed cleanly, so the WAL was checkpointed into the main file
    return World(path, dict(ids))


class Clock:
    def __init__(self):
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(world, clock):
    db = open_database(world.path)
    app = create_app(db, AppSettings(dt.timedelta(hours=12), dt.timedelta(hours=2)), clock=clock)
    yield app
    db.close()


def _db(world):
    return open_database(world.path)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _submission_key(html: str) -> str:
    return re.search(r'name="submission_key" value="([0-9a-f]{32})"', html).group(1)


def login(client, name: str, secret: str | None = None, next_url: str | None = None):
    page = client.get("/login")
    data = {"username": name, "secret": secret or SECRETS[name], "csrf_token": _csrf(page.text)}
    if next_url is not None:
        data["next"] = next_url
    return client.post("/login", data=data)


@pytest.fixture
def alice(app):
    client = app.test_client()
    assert login(client, "alice").status_code == 303
    return client


@pytest.fixture
def bob(app):
    client = app.test_client()
    assert login(client, "bob").status_code == 303
    return client


def _form_for(client, assignment_id: int, **fields):
    """The task page's hidden fields plus ``fields``; returns (form, page_html)."""
    page = client.get(f"/task/{assignment_id}")
    assert page.status_code == 200, page.text
    data = {"csrf_token": _csrf(page.text), "submission_key": _submission_key(page.text)}
    version = re.search(r'name="version" value="(\d+)"', page.text)
    if version:
        data["version"] = version.group(1)
    data.update(fields)
    return data, page.text


def _ranking_fields(ranks, quality=(5, 4, 3, 2), flags=None):
    fields = {}
    for p, rank in enumerate(ranks):
        fields[f"rank_{p}"] = str(rank)
        fields[f"quality_{p}"] = str(quality[p])
    for p, names in (flags or {}).items():
        fields[f"flag_{p}"] = list(names)
    return fields


def _labels(world) -> list[Label]:
    with _db(world) as db, db.read() as s:
        return list(s.scalars(select(Label).order_by(Label.id)))


# --------------------------------------------------------------------------- login, sessions, permissions


@pytest.mark.parametrize("path", ["/", "/history", "/task/1", "/admin", "/admin/agreement"])
def test_pages_need_login(app, path):
    response = app.test_client().get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=" + urllib.parse.quote(path, safe="/"))


def test_login_page_and_successful_login_redirects_to_next(app):
    client = app.test_client()
    page = client.get("/login")
    assert page.status_code == 200 and 'name="secret"' in page.text
    response = login(client, "alice", next_url="/history")
    assert response.status_code == 303 and response.headers["Location"] == "/history"
    assert client.get("/history").status_code == 200
    assert client.get("/login").status_code == 302  # already logged in


@pytest.mark.parametrize(
    ("name", "secret"), [("alice", "wrong-secret-123"), ("nobody", "whatever-secret"), ("ALICE ", "bob-secret-1234")]
)
def test_failed_login_gives_one_message_and_no_session(app, name, secret):
    client = app.test_client()
    response = login(client, name, secret)
    assert response.status_code == 401
    assert "Unknown username, or wrong or expired secret." in response.text
    assert client.get("/").status_code == 302


def test_username_is_case_insensitive(app):
    assert login(app.test_client(), " Alice", SECRETS["alice"]).status_code == 303


def test_login_ignores_offsite_next(app):
    response = login(app.test_client(), "alice", next_url="//evil.example/")
    assert response.headers["Location"] == "/"


def test_login_form_is_validated(app):
    client = app.test_client()
    token = _csrf(client.get("/login").text)
    response = client.post("/login", data={"username": "", "secret": "x" * 300, "csrf_token": token})
    assert response.status_code == 400 and "Enter your username." in response.text


def test_expired_secret_and_inactive_account_cannot_log_in(app, world, clock):
    with _db(world) as db, db.write() as s:
        create_or_update_labeler(s, "alice", rotate=True, secret="new-alice-secret", secret_days=1, now=clock.now)
        create_or_update_labeler(s, "bob", active=False)
    clock.now += dt.timedelta(days=2)
    assert login(app.test_client(), "alice", "new-alice-secret").status_code == 401
    assert login(app.test_client(), "bob").status_code == 401


def test_login_issues_a_fresh_session_cookie(app):
    client = app.test_client()
    client.get("/login")
    before = client.get_cookie("instructrl_label").value
    login(client, "alice")
    after = client.get_cookie("instructrl_label").value
    assert before != after
    cookie = client.get_cookie("instructrl_label")
    assert cookie.http_only and cookie.same_site == "Lax"


def test_logout_ends_the_server_side_session(app, world):
    client = app.test_client()
    login(client, "alice")
    stolen = client.get_cookie("instructrl_label").value
    page = client.get("/")
    assert client.post("/logout", data={"csrf_token": _csrf(page.text)}).status_code == 303
    assert client.get("/").status_code == 302
    replay = app.test_client()
    replay.set_cookie("instructrl_label", stolen)  # the old cookie no longer opens a session
    assert replay.get("/").status_code == 302
    with _db(world) as db, db.read() as s:
        assert s.scalar(select(func.count()).select_from(LoginSession)) == 0


def test_session_expires_after_its_lifetime_even_when_active(app, clock):
    client = app.test_client()
    login(client, "alice")
    for _ in range(13):
        clock.now += dt.timedelta(hours=1)
        client.get("/")
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("action", ["", "/skip"])
def test_submitting_after_the_session_expired_leads_back_to_the_task_after_login(world, alice, clock, action):
    task = f"/task/{world.ids['demo_alice']}"
    form, _ = _form_for(alice, world.ids["demo_alice"], response="typed for a long time", reason="unclear")
    clock.now += dt.timedelta(hours=3)
    response = alice.post(task + action, data=form)
    assert response.status_code == 303
    assert response.headers["Location"] == "/login?next=" + task
    login_page = alice.get(response.headers["Location"])
    assert "Your login has expired." in login_page.text and "kept in this browser" in login_page.text
    assert _labels(world) == []
    back = login(alice, "alice", next_url=task)
    assert back.headers["Location"] == task
    # the task page carries the draft key under which the browser kept the typed text (see the e2e test)
    assert 'data-draft="alice:1"' in alice.get(task).text


def test_session_expires_when_idle(app, clock):
    client = app.test_client()
    login(client, "alice")
    clock.now += dt.timedelta(minutes=119)
    assert client.get("/").status_code == 200  # activity refreshes the idle timer
    clock.now += dt.timedelta(minutes=119)
    assert client.get("/").status_code == 200
    clock.now += dt.timedelta(minutes=121)
    assert client.get("/").status_code == 302


def test_deactivating_a_labeler_ends_their_session(app, world, alice):
    assert alice.get("/").status_code == 200
    with _db(world) as db, db.write() as s:
        create_or_update_labeler(s, "alice", active=False)
    assert alice.get("/").status_code == 302


def test_admin_pages_need_the_admin_role(app, alice):
    assert alice.get("/admin").status_code == 403
    assert alice.get("/admin/agreement").status_code == 403
    assert 'href="/admin"' not in alice.get("/").text
    boss = app.test_client()
    login(boss, "boss")
    page = boss.get("/admin")
    assert page.status_code == 200 and "alice" in page.text and 'id="overall-agreement"' in page.text
    assert boss.get("/admin/agreement").status_code == 200


def test_queue_and_history_show_only_own_work(world, alice, bob):
    queue = alice.get("/").text
    assert f'href="/task/{world.ids["demo_alice"]}"' in queue
    assert f'href="/task/{world.ids["cmp2_alice"]}"' in queue
    assert f'href="/task/{world.ids["demo_bob"]}"' not in queue
    assert "Second demo prompt" not in queue  # bob's prompt
    form, _ = _form_for(bob, world.ids["demo_bob"], response="bob's answer")
    bob.post(f"/task/{world.ids['demo_bob']}", data=form)
    assert "Second demo prompt" in bob.get("/history").text
    assert "Second demo prompt" not in alice.get("/history").text


def test_a_labeler_cannot_open_or_submit_someone_elses_item(world, alice, bob):
    foreign = world.ids["demo_alice"]
    assert bob.get(f"/task/{foreign}").status_code == 404
    assert bob.get("/task/99999").status_code == 404  # same answer whether or not it exists
    token = _csrf(bob.get("/").text)
    key = "a" * 32
    assert (
        bob.post(f"/task/{foreign}", data={"csrf_token": token, "submission_key": key, "response": "x"}).status_code
        == 404
    )
    skip = bob.post(f"/task/{foreign}/skip", data={"csrf_token": token, "reason": "unclear"})
    assert skip.status_code == 404
    assert _labels(world) == []
    with _db(world) as db, db.read() as s:
        assert s.get(Assignment, foreign).status == "pending"


# --------------------------------------------------------------------------- CSRF and request limits


def test_every_post_needs_the_csrf_token(app, world, alice):
    a = world.ids["demo_alice"]
    form, _ = _form_for(alice, a, response="an answer")
    for bad in [None, "", "forged-token", _csrf(app.test_client().get("/login").text)]:
        data = dict(form)
        if bad is None:
            del data["csrf_token"]
        else:
            data["csrf_token"] = bad
        response = alice.post(f"/task/{a}", data=data)
        assert response.status_code == 403
        assert "did not come from this site" in response.text
        assert alice.post(f"/task/{a}/skip", data={**data, "reason": "unclear"}).status_code == 403
        assert alice.post("/logout", data={k: v for k, v in data.items() if k == "csrf_token"}).status_code == 403
    assert _labels(world) == []
    assert alice.get("/").status_code == 200  # still logged in
    anonymous = app.test_client()
    assert anonymous.post("/login", data={"username": "alice", "secret": SECRETS["alice"]}).status_code == 403


def test_csrf_token_is_bound_to_the_session(world, alice, bob):
    form, _ = _form_for(alice, world.ids["demo_alice"], response="x")
    form["csrf_token"] = _csrf(bob.get("/").text)
    assert alice.post(f"/task/{world.ids['demo_alice']}", data=form).status_code == 403


def test_oversized_request_is_refused(world, alice):
    form, _ = _form_for(alice, world.ids["demo_alice"], response="x" * (forms.MAX_FORM_BYTES + 10))
    assert alice.post(f"/task/{world.ids['demo_alice']}", data=form).status_code == 413
    assert _labels(world) == []


def test_wrong_methods_are_refused(alice):
    assert alice.get("/logout").status_code == 405
    assert alice.delete("/task/1").status_code == 405


def test_security_headers(app, alice):
    response = alice.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert app.test_client().get("/static/rank.js").status_code == 200
    assert app.test_client().get("/favicon.ico").status_code == 204


# --------------------------------------------------------------------------- escaping


def test_prompts_and_responses_are_rendered_as_text(world, alice):
    cmp_page = alice.get(f"/task/{world.ids['cmp_alice']}").text
    assert "<script>alert" not in cmp_page and "&lt;script&gt;alert(&#39;prompt&#39;)&lt;/script&gt;" in cmp_page
    assert "<img src=x" not in cmp_page and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in cmp_page
    demo_page = alice.get(f"/task/{world.ids['demo_alice']}").text
    assert "<b>cats</b>" not in demo_page and "&lt;b&gt;cats&lt;/b&gt; &amp; dogs" in demo_page
    queue = alice.get("/").text
    assert "<script>alert" not in queue and "<b>cats" not in queue
    # a demonstration that closes the textarea stays inside it when shown again for editing
    evil = "</textarea><script>alert(2)</script>"
    form, _ = _form_for(alice, world.ids["demo_alice"], response=evil)
    alice.post(f"/task/{world.ids['demo_alice']}", data=form)
    edit_page = alice.get(f"/task/{world.ids['demo_alice']}").text
    assert "<script>alert(2)" not in edit_page and "&lt;/textarea&gt;&lt;script&gt;alert(2)" in edit_page


# --------------------------------------------------------------------------- demonstrations


def test_submit_demonstration_then_next_item(world, alice):
    a = world.ids["demo_alice"]
    form, page = _form_for(alice, a, response="  Cats purr,\r\ndogs bark.  ")
    assert 'id="response"' in page and "Write the ideal response" in page
    response = alice.post(f"/task/{a}", data=form)
    assert response.status_code == 303
    assert response.headers["Location"] == f"/task/{world.ids['cmp_alice']}"  # the next pending item
    (label,) = _labels(world)
    assert (label.response, label.version) == ("Cats purr,\ndogs bark.", 1)
    assert "Submitted." in alice.get(response.headers["Location"]).text


def test_resubmitting_the_same_form_is_stored_once(world, alice):
    a = world.ids["demo_alice"]
    form, _ = _form_for(alice, a, response="first")
    assert alice.post(f"/task/{a}", data=form).status_code == 303
    again = alice.post(f"/task/{a}", data={**form, "response": "changed in flight"})
    assert again.status_code == 303
    (label,) = _labels(world)
    assert (label.response, label.version) == ("first", 1)
    with _db(world) as db, db.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 1


def test_a_second_tab_cannot_overwrite_a_submission(world, alice):
    a = world.ids["demo_alice"]
    tab1, _ = _form_for(alice, a, response="from tab 1")
    tab2, _ = _form_for(alice, a, response="from tab 2")
    alice.post(f"/task/{a}", data=tab1)
    response = alice.post(f"/task/{a}", data=tab2)
    assert response.status_code == 409 and "already submitted" in response.text
    assert _labels(world)[0].response == "from tab 1"


def test_edit_own_past_work_with_versions(world, alice):
    a = world.ids["demo_alice"]
    form, _ = _form_for(alice, a, response="v1")
    alice.post(f"/task/{a}", data=form)
    edit, page = _form_for(alice, a, response="v2")
    assert "Save changes" in page and ">v1</textarea>" in page and edit["version"] == "1"
    stale = dict(edit)
    assert alice.post(f"/task/{a}", data=edit).status_code == 303
    assert (_labels(world)[0].response, _labels(world)[0].version) == ("v2", 2)
    stale["submission_key"] = "f" * 32  # an edit rendered from version 1, submitted after version 2 exists
    assert alice.post(f"/task/{a}", data=stale).status_code == 409
    assert _labels(world)[0].response == "v2"
    assert "(edited)" in alice.get("/history").text


@pytest.mark.parametrize(
    ("response", "message"),
    [("", "The response is empty."), ("   ", "The response is empty."), ("x" * 10_001, "the limit is 10000")],
)
def test_invalid_demonstration_is_refused(world, alice, response, message):
    form, _ = _form_for(alice, world.ids["demo_alice"], response=response)
    page = alice.post(f"/task/{world.ids['demo_alice']}", data=form)
    assert page.status_code == 400 and message in page.text
    assert _labels(world) == []


def test_malformed_submission_key_is_refused(world, alice):
    form, _ = _form_for(alice, world.ids["demo_alice"], response="ok", submission_key="not-a-key")
    page = alice.post(f"/task/{world.ids['demo_alice']}", data=form)
    assert page.status_code == 400 and "reload the page" in page.text
    assert _labels(world) == []


# --------------------------------------------------------------------------- rankings


def test_comparison_page_shows_responses_in_the_assignments_random_order(world, alice, bob):
    with _db(world) as db, db.read() as s:
        orders = {
            name: s.get(Assignment, world.ids[name]).display_order for name in ("cmp_alice", "cmp_bob", "cmp2_alice")
        }
    for client, name in [(alice, "cmp_alice"), (bob, "cmp_bob")]:
        page = client.get(f"/task/{world.ids[name]}").text
        shown = [
            int(p) for p in re.findall(r'<article class="response" id="response-[A-I]" data-position="(\d)"', page)
        ]
        assert shown == orders[name]
        assert page.count('class="rank-item"') == 4 and 'name="rank_3"' in page
        for name_flag in forms.FLAGS:
            assert f'value="{name_flag}"' in page
        assert page.count('type="radio" name="quality_0"') == 7
    assert len({tuple(o) for o in orders.values()}) > 1


def test_submit_ranking_stores_canonical_ranking_ties_and_metadata(world, alice):
    a = world.ids["cmp_alice"]
    fields = _ranking_fields([2, 1, 2, 3], quality=(6, 7, 6, 1), flags={3: ["hallucination", "violent_content"]})
    form, _ = _form_for(alice, a, **fields)
    assert alice.post(f"/task/{a}", data=form).status_code == 303
    (label,) = _labels(world)
    assert label.ranking == [1, [0, 2], 3] and label.response is None
    with _db(world) as db, db.read() as s:
        ratings = s.scalars(select(ResponseRating).order_by(ResponseRating.position)).all()
        assert [r.quality for r in ratings] == [6, 7, 6, 1]
        assert ratings[3].hallucination and ratings[3].violent_content and not ratings[3].harmful_content
        assert not any(r.hallucination for r in ratings[:3])
        assert s.get(Assignment, a).status == "done"


def test_edit_ranking_shows_saved_values_and_updates_in_place(world, alice):
    a = world.ids["cmp_alice"]
    form, _ = _form_for(alice, a, **_ranking_fields([1, 2, 3, 4], flags={0: ["harmful_content"]}))
    alice.post(f"/task/{a}", data=form)
    page = alice.get(f"/task/{a}").text
    assert re.search(r'name="quality_0" value="5" id="quality-[A-D]-5" checked', page)
    assert re.search(r'name="flag_0" value="harmful_content" id="[^"]+" checked', page)
    edit, _ = _form_for(alice, a, **_ranking_fields([4, 3, 2, 2], quality=(1, 2, 3, 3)))
    assert alice.post(f"/task/{a}", data=edit).status_code == 303
    (label,) = _labels(world)
    assert label.ranking == [[2, 3], 1, 0] and label.version == 2
    with _db(world) as db, db.read() as s:
        ratings = s.scalars(select(ResponseRating)).all()
        assert len(ratings) == 4 and not any(r.harmful_content for r in ratings)


def test_invalid_ranking_keeps_the_entered_values_and_stores_nothing(world, alice):
    a = world.ids["cmp_alice"]
    fields = _ranking_fields([1, 2, 3, 4], quality=(5, 4, 3, 2), flags={1: ["hallucination"]})
    fields["quality_2"] = "9"
    fields["rank_0"] = "0"
    form, _ = _form_for(alice, a, **fields)
    page = alice.post(f"/task/{a}", data=form)
    assert page.status_code == 400
    assert (
        "The overall quality score must be from 1 to 7." in page.text and "The rank must be from 1 to 4." in page.text
    )
    assert re.search(r'name="quality_0" value="5" id="[^"]+" checked', page.text)
    assert re.search(r'name="flag_1" value="hallucination" id="[^"]+" checked', page.text)
    assert _labels(world) == []
    fields = _ranking_fields([1, 2, 3, 4])
    del fields["quality_3"]
    form, _ = _form_for(alice, a, **fields)
    assert alice.post(f"/task/{a}", data=form).status_code == 400
    form, _ = _form_for(alice, a, **_ranking_fields([1, 2, 3, 4], flags={0: ["made_up_flag"]}))
    assert alice.post(f"/task/{a}", data=form).status_code == 400
    assert _labels(world) == []


def test_demonstration_fields_do_not_label_a_comparison(world, alice):
    form, _ = _form_for(alice, world.ids["cmp_alice"], response="just text")
    assert alice.post(f"/task/{world.ids['cmp_alice']}", data=form).status_code == 400
    assert _labels(world) == []


# --------------------------------------------------------------------------- skipping


def test_skip_with_reason_then_label_later(world, alice):
    a = world.ids["demo_alice"]
    token = _csrf(alice.get(f"/task/{a}").text)
    missing = alice.post(f"/task/{a}/skip", data={"csrf_token": token, "reason": ""})
    assert missing.status_code == 400 and "Choose a reason" in missing.text
    other = alice.post(f"/task/{a}/skip", data={"csrf_token": token, "reason": "other", "note": ""})
    assert other.status_code == 400 and "The note is empty." in other.text
    ok = alice.post(f"/task/{a}/skip", data={"csrf_token": token, "reason": "other", "note": "needs <context>"})
    assert ok.status_code == 303
    assert assignment_outcome(world.path, a) == ("skipped", "other", "needs <context>")
    assert f'href="/task/{a}"' not in alice.get("/").text  # off the queue, in the history
    assert "skipped: Other" in alice.get("/history").text
    form, page = _form_for(alice, a, response="labeled after all")
    assert "skipped" in page
    alice.post(f"/task/{a}", data=form)
    with _db(world) as db, db.read() as s:
        assignment = s.get(Assignment, a)
        assert (assignment.status, assignment.skip_reason) == ("done", None)


def test_submitted_work_cannot_be_skipped(world, alice):
    a = world.ids["demo_alice"]
    form, _ = _form_for(alice, a, response="done")
    alice.post(f"/task/{a}", data=form)
    page = alice.get(f"/task/{a}").text
    assert 'id="skip-form"' not in page
    response = alice.post(f"/task/{a}/skip", data={"csrf_token": _csrf(page), "reason": "unclear"})
    assert response.status_code == 409
    with _db(world) as db, db.read() as s:
        assert s.get(Assignment, a).status == "done"


def test_empty_queue_message(world, bob):
    for name in ("demo_bob", "cmp_bob"):
        fields = {"response": "ok"} if name == "demo_bob" else _ranking_fields([1, 2, 3, 4])
        form, _ = _form_for(bob, world.ids[name], **fields)
        last = bob.post(f"/task/{world.ids[name]}", data=form)
    assert last.headers["Location"] == "/"
    assert 'id="queue-empty"' in bob.get("/").text


def test_agreement_appears_on_the_admin_page(app, world, alice, bob):
    for client, name, ranks in [(alice, "cmp_alice", [1, 2, 3, 4]), (bob, "cmp_bob", [1, 2, 4, 3])]:
        form, _ = _form_for(client, world.ids[name], **_ranking_fields(ranks))
        client.post(f"/task/{world.ids[name]}", data=form)
    boss = app.test_client()
    login(boss, "boss")
    page = boss.get("/admin/agreement").text
    assert "83.3%" in page  # 5 of 6 response pairs ordered alike
    assert "alice / bob" in page


# --------------------------------------------------------------------------- export consistency


def test_export_reads_one_snapshot_while_labels_are_written(world):
    with _db(world) as db:
        with db.write() as s:
            a = s.get(Assignment, world.ids["cmp_alice"])
            s.add(Label(assignment=a, submission_key="1" * 32, ranking=[0, 1, 2, 3], version=1,
                        submitted_at=a.created_at, updated_at=a.created_at))  # fmt: skip
            a.status = "done"
        with db.read() as reader:
            first = comparison_records(reader)
            with db.write() as s:  # a labeler submits while the export runs
                b = s.get(Assignment, world.ids["cmp_bob"])
                label = Label(assignment=b, submission_key="2" * 32, ranking=[3, 2, 1, 0], version=1,
                              submitted_at=b.created_at, updated_at=b.created_at)  # fmt: skip
                label.ratings = [
                    ResponseRating(position=p, quality=4, **dict.fromkeys(forms.FLAGS, False)) for p in range(4)
                ]
                s.add(label)
                b.status = "done"
            second = comparison_records(reader)
        assert first == second and len(first) == 1  # the export never sees half of a later state
        with db.read() as reader:
            assert len(comparison_records(reader)) == 2


# --------------------------------------------------------------------------- a real server under parallel load


class HttpClient:
    """A minimal browser: cookies, redirects followed, 4xx/5xx returned instead of raised."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path: str, data: dict | None = None) -> tuple[int, str, str]:
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        try:
            with self.opener.open(self.base + path, data=body, timeout=60) as response:
                return response.status, response.url, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.url, e.read().decode()


@pytest.fixture
def server(tmp_path):
    """``label serve`` (Waitress) in a subprocess on a free port; yields (base_url, db_path)."""
    db_path = tmp_path / "server.sqlite"
    open_database(db_path).close()  # serve needs an existing database
    with label_serve_process(db_path) as url:  # 8 threads, the default
        yield url.rstrip("/"), db_path


PARALLEL_SECRET = "shared-secret-for-load-test"


def test_parallel_submissions_from_many_labelers_lose_nothing(server):
    base, db_path = server
    names = [f"labeler{i}" for i in range(8)]
    with open_database(db_path) as db, db.write() as s:
        shared_hash = generate_password_hash(PARALLEL_SECRET, method=CHEAP_HASH)
        people = {name: Labeler(username=name, role="labeler", secret_hash=shared_hash, active=True,
                                created_at=utcnow()) for name in names}  # fmt: skip
        s.add_all(people.values())
        add_prompts(s, [PromptRecord(f"prompt {i}") for i in range(3 + len(names))], "comparison")
        prompt_ids = s.scalars(select(Prompt.id).order_by(Prompt.id)).all()
        items = [add_comparison_item(s, pid, [f"r{j} for {pid}" for j in range(4)]) for pid in prompt_ids]
        rng = random.Random(0)
        for item in items[:3]:  # three items shared by all eight labelers (overlap)
            for name in names:
                add_assignment(s, item, people[name], rng)
        for name, item in zip(names, items[3:]):  # and one item each, alone
            add_assignment(s, item, people[name], rng)

    barrier = threading.Barrier(len(names))
    statuses: list[tuple[str, int, str]] = []
    exports: list[list[dict]] = []
    stop_exporting = threading.Event()

    errors: list[str] = []

    def labeler(name: str) -> None:
        try:
            client = HttpClient(base)
            status, _, page = client.request("/login")
            status, url, _ = client.request(
                "/login", {"username": name, "secret": PARALLEL_SECRET, "csrf_token": _csrf(page)}
            )
            assert status == 200 and url.endswith("/"), (status, url)
            forms_to_send = []
            _, _, queue = client.request("/")
            for assignment_id in re.findall(r'<td><a href="/task/(\d+)">', queue):
                _, _, page = client.request(f"/task/{assignment_id}")
                fields = _ranking_fields([1, 2, 3, 4], quality=(7, 5, 3, 1))
                fields.update(csrf_token=_csrf(page), submission_key=_submission_key(page))
                forms_to_send.append((assignment_id, fields))
            barrier.wait(timeout=60)  # everyone submits at the same moment
            for assignment_id, fields in forms_to_send:
                for _ in range(2):  # and every form twice (a double click)
                    status, url, _ = client.request(f"/task/{assignment_id}", fields)
                    statuses.append((name, status, url))
        except Exception as e:  # reported below; abort() releases the others from the barrier
            errors.append(f"{name}: {e!r}")
            barrier.abort()

    def exporter() -> None:
        with open_database(db_path) as db:
            while not stop_exporting.is_set():
                with db.read() as s:
                    exports.append(comparison_records(s))
                stop_exporting.wait(0.02)  # leave the GIL to the client threads most of the time

    export_thread = threading.Thread(target=exporter)
    export_thread.start()
    threads = [threading.Thread(target=labeler, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop_exporting.set()
    export_thread.join(timeout=60)

    assert not errors, errors
    assert len(statuses) == len(names) * 4 * 2
    assert all(status == 200 for _, status, _ in statuses), statuses
    with open_database(db_path) as db, db.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == len(names) * 4
        assert set(s.scalars(select(Label.version))) == {1}
        assert s.scalar(select(func.count()).select_from(ResponseRating)) == len(names) * 4 * 4
        assert set(s.scalars(select(Assignment.status).where(Assignment.labeler_id.in_(
            select(Labeler.id).where(Labeler.username.in_(names)))))) == {"done"}  # fmt: skip
        final = comparison_records(s)
    assert len(final) == len(names) * 4
    assert exports, "the exporter ran"
    for snapshot in exports:  # every export taken during the run is complete for each label it holds
        assert all(len(r["ratings"]) == 4 and r["ranking"] == [0, 1, 2, 3] for r in snapshot)
        assert len(snapshot) <= len(final)


def test_long_queue_shows_the_first_rows_and_a_count(world, alice, monkeypatch):
    from instructrl.label import app as app_module

    monkeypatch.setattr(app_module, "LIST_LIMIT", 1)
    page = alice.get("/").text
    assert page.count('<td><a href="/task/') == 1
    assert "3 to do · 0 submitted · 0 skipped" in page and "… and 2 more." in page


# --------------------------------------------------------------------------- throttling, logs, the server's limit


def test_failed_logins_are_throttled_per_account_with_backoff(app, clock, caplog):
    client = app.test_client()
    statuses = [login(client, "alice", "wrong-secret-999").status_code for _ in range(30)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}  # 5 free tries, then a wait
    refused = login(client, "alice")  # even the right secret waits: the account is under attack
    assert refused.status_code == 429 and "Try again in 2 seconds" in refused.text
    assert refused.headers["Retry-After"] == "2"
    clock.now += dt.timedelta(seconds=2)
    assert login(client, "alice", "wrong-again-999").status_code == 401
    assert "Try again in 4 seconds" in login(client, "alice").text  # the wait doubles with each failure
    clock.now += dt.timedelta(seconds=4)
    assert login(client, "alice").status_code == 303
    assert login(app.test_client(), "alice", "wrong-secret-999").status_code == 401  # success cleared the count
    assert login(app.test_client(), "bob").status_code == 303  # other accounts were never held up
    failed = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len(failed) == 5 + 1 + 1 and "'alice'" in failed[0]
    assert any("throttled login" in r.getMessage() for r in caplog.records)


def _client_at(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def test_failed_logins_are_throttled_per_address(app):
    client = _client_at(app, "203.0.113.7")
    statuses = [login(client, f"nobody{i}", "wrong-secret-999").status_code for i in range(25)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    assert login(client, "alice").status_code == 429  # a known account, from the guessing address
    assert login(_client_at(app, "198.51.100.1"), "alice").status_code == 303


def test_access_log_has_one_line_per_request_and_no_secrets(app, world, caplog):
    caplog.set_level(logging.INFO, logger="instructrl.label")
    client = app.test_client()
    login(client, "alice")  # two requests: the login page and the POST
    a = world.ids["demo_alice"]
    form, _ = _form_for(client, a, response="my demonstration")
    client.post(f"/task/{a}?x=query-secret", data=form)
    access = [r.getMessage() for r in caplog.records if r.name == "instructrl.label.access"]
    assert len(access) == 4
    assert access[1].startswith('127.0.0.1 - "POST /login" 303') and access[2].startswith(
        '127.0.0.1 alice "GET /task/1" 200'
    )
    assert access[3].startswith('127.0.0.1 alice "POST /task/1" 303')
    text = "\n".join(r.getMessage() for r in caplog.records)
    cookie = client.get_cookie("instructrl_label").value
    for secret in (SECRETS["alice"], form["csrf_token"], cookie, "my demonstration", "query-secret"):
        assert secret not in text
    assert any(
        r.name == "instructrl.label.events" and r.getMessage() == "login 'alice' from 127.0.0.1"
        for r in caplog.records
    )


def test_admin_lands_on_the_admin_page_and_its_views_are_logged(app, caplog):
    caplog.set_level(logging.INFO, logger="instructrl.label.events")
    client = app.test_client()
    assert login(client, "boss").headers["Location"] == "/admin"
    assert client.get("/login").headers["Location"] == "/admin"
    assert login(app.test_client(), "alice").headers["Location"] == "/"
    client.get("/admin")
    assert "admin 'boss' viewed /admin" in [r.getMessage() for r in caplog.records]


def test_request_bodies_over_the_form_limit_are_refused_before_they_are_read(server):
    """The server answers 413 from the Content-Length alone: a 50 MB body is never read."""
    base, _ = server
    host, port = urllib.parse.urlsplit(base).hostname, urllib.parse.urlsplit(base).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 50000000\r\n\r\n" + b"a" * 1000
        )
        sock.settimeout(10)
        reply = sock.recv(200)  # old behaviour: the server waits for 50 MB, and this times out
    assert reply.startswith(b"HTTP/1.1 413")


# --------------------------------------------------------------------------- task pages and the queue


def test_an_all_tied_ranking_is_stored_only_when_confirmed(world, alice):
    a = world.ids["cmp_alice"]
    form, _ = _form_for(alice, a, **_ranking_fields([1, 1, 1, 1]))
    refused = alice.post(f"/task/{a}", data=form)
    assert refused.status_code == 400 and "equally good" in refused.text
    assert 'name="confirm_all_tied"' in refused.text and _labels(world) == []
    assert alice.post(f"/task/{a}", data={**form, "confirm_all_tied": "1"}).status_code == 303
    (label,) = _labels(world)
    assert label.ranking == [[0, 1, 2, 3]]
    assert 'name="confirm_all_tied" value="1" id="confirm-all-tied" checked' in alice.get(f"/task/{a}").text


def test_skip_form_keeps_reason_and_note_after_an_error(world, alice):
    a = world.ids["demo_alice"]
    token = _csrf(alice.get(f"/task/{a}").text)
    no_reason = alice.post(f"/task/{a}/skip", data={"csrf_token": token, "reason": "", "note": "my long note"})
    assert no_reason.status_code == 400 and "Choose a reason" in no_reason.text
    assert ">my long note</textarea>" in no_reason.text
    assert not re.search(r'<select id="skip-reason"[^>]*required', no_reason.text)  # no silent browser block
    no_note = alice.post(f"/task/{a}/skip", data={"csrf_token": token, "reason": "other", "note": ""})
    assert no_note.status_code == 400 and '<option value="other" selected>' in no_note.text


def test_task_page_shows_the_item_number(world, bob):
    page = bob.get(f"/task/{world.ids['cmp_bob']}").text  # assignment 4 of the shared comparison item 3
    assert re.search(r"Item 3 ·", page) and "Item 4" not in page


def _add_demonstrations_for(world, name: str, n: int) -> None:
    with _db(world) as db, db.write() as s:
        labeler = s.scalar(select(Labeler).where(Labeler.username == name))
        add_prompts(s, [PromptRecord(f"extra demo {i}") for i in range(n)], "demonstration")
        for item in s.scalars(select(Item).where(Item.kind == "demonstration").order_by(Item.id.desc()).limit(n)):
            add_assignment(s, item, labeler, random.Random(0))


def _choose_work(client, kind: str):
    return client.post("/work", data={"csrf_token": _csrf(client.get("/").text), "work": kind})


def test_queue_alternates_kinds_and_the_labeler_can_choose_one(world, alice):
    _add_demonstrations_for(world, "alice", 4)  # alice: demo, 2 comparisons, then 4 more demos
    kinds = re.findall(r"<td>(Write a response|Rank responses)</td>", alice.get("/").text)
    assert kinds[:4] == ["Write a response", "Rank responses", "Write a response", "Rank responses"]
    assert _choose_work(alice, "comparison").headers["Location"] == "/"
    page = alice.get("/").text
    assert set(re.findall(r"<td>(Write a response|Rank responses)</td>", page)) == {"Rank responses"}
    form, _ = _form_for(alice, world.ids["cmp_alice"], **_ranking_fields([1, 2, 3, 4]))
    # the choice is kept: after a submission the next item is of the chosen kind
    next_page = alice.post(f"/task/{world.ids['cmp_alice']}", data=form).headers["Location"]
    assert next_page == f"/task/{world.ids['cmp2_alice']}"
    _choose_work(alice, "demonstration")
    assert set(re.findall(r"<td>(Write a response|Rank responses)</td>", alice.get("/").text)) == {"Write a response"}
    assert _choose_work(alice, "everything").status_code == 400


def test_an_admin_sets_the_kind_of_work_per_labeler(world, app):
    with _db(world) as db, db.write() as s:
        assert create_or_update_labeler(s, "bob", work="comparison").work == "comparison"
    bob = app.test_client()
    login(bob, "bob")
    page = bob.get("/").text
    assert re.findall(r"<td>(Write a response|Rank responses)</td>", page) == ["Rank responses"]
    assert 'value="comparison" class="primary" aria-pressed="true"' in page
