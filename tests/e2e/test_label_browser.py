"""End to end in a real browser: log in, write a demonstration, rank with the mouse and with the keyboard,
submit, edit, export; another labeler cannot open the first one's items; admins see progress.

Headless Chromium driven by Playwright against ``instructrl label serve`` started through the real command
line. Needs Debian's ``chromium`` at /usr/bin/chromium (or ``INSTRUCTRL_CHROMIUM=/path``) and the
``playwright`` Python package; Playwright's own browser download is never used. Without them the module is
skipped with the install command. Screenshots go to ``tests/e2e/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import assignment_outcome, label_serve_process
from instructrl.config import load_config
from instructrl.data.loading import load_comparisons, load_demonstrations

CHROMIUM = Path(os.environ.get("INSTRUCTRL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SECRETS = {"alice": "alice-e2e-secret-1", "bob": "bob-e2e-secret-12", "boss": "boss-e2e-secret-1"}
DEMO_PROMPT = "Explain <b>photosynthesis</b> to a child & keep it short."
COMPARE_PROMPTS = [
    "Which answer is best? <script>window.__injected = 1; alert('prompt')</script>",
    "Name a fruit that is yellow.",
]
COMPARE_RESPONSES = [
    [
        '<img src=x onerror="window.__injected = 2"> An image tag, shown as text.',
        "Plants use sunlight to make food.",
        "I don't know.",
        "Sunlight + water + air = sugar for the plant.",
    ],
    ["A banana.", "A lemon.", "The sky.", "Bananas and lemons are both yellow."],
]


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[dev]' (browser download not needed)"
    if not CHROMIUM.is_file():
        return (
            f"chromium not found at {CHROMIUM}: install it with 'apt-get update && apt-get install -y chromium' "
            "(or set INSTRUCTRL_CHROMIUM to a Chromium binary)"
        )
    return None


_SKIP = _skip_reason()
if _SKIP is not None:
    pytest.skip(_SKIP, allow_module_level=True)


@dataclass
class LabelServer:
    url: str
    db: Path
    tmp: Path
    assignment_ids: dict[str, list[int]]
    """Per labeler, their assignment ids in queue order."""


def _set(module, **values):
    """A config built as the command line builds it from ``--set key=value``."""
    return load_config(module.Config, None, [f"{k}={v}" for k, v in values.items()])


def _build_database(tmp: Path) -> tuple[Path, dict[str, list[int]]]:
    """The admin side, with the same commands a person runs (``instructrl label ...``)."""
    from sqlalchemy import select

    from instructrl.label import assign, create_labeler, load_prompts
    from instructrl.label.db import Assignment, Labeler, Prompt, open_database
    from instructrl.label.tasks import add_comparison_item

    db = tmp / "labels.sqlite"
    for name, secret in SECRETS.items():
        role = "admin" if name == "boss" else "labeler"
        create_labeler.run(_set(create_labeler, db=db, username=name, secret=secret, role=role))
    demo_file, compare_file = tmp / "demo.jsonl", tmp / "compare.jsonl"
    demo_file.write_text(json.dumps({"prompt": DEMO_PROMPT, "user_id": "u1"}) + "\n", encoding="utf-8")
    compare_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in COMPARE_PROMPTS), encoding="utf-8")
    load_prompts.run(_set(load_prompts, db=db, prompts=demo_file))
    load_prompts.run(_set(load_prompts, db=db, prompts=compare_file, task="comparison"))
    # ``label add-samples`` would sample these from a policy; fixed texts keep the test's expectations exact
    with open_database(db) as database, database.write() as s:
        prompt_ids = s.scalars(select(Prompt.id).where(Prompt.task == "comparison").order_by(Prompt.id)).all()
        for prompt_id, responses in zip(prompt_ids, COMPARE_RESPONSES):
            add_comparison_item(s, prompt_id, responses, ["e2e-policy"] * len(responses))
    assign.run(_set(assign, db=db, labelers="[alice]", overlap_fraction=0.0))
    with open_database(db) as database, database.read() as s:
        ids = {
            name: list(
                s.scalars(select(Assignment.id).join(Labeler).where(Labeler.username == name).order_by(Assignment.id))
            )
            for name in SECRETS
        }
    return db, ids


@pytest.fixture(scope="module")
def label_server(tmp_path_factory) -> Iterator[LabelServer]:
    """``instructrl label serve`` on a free port, started through the real command line."""
    tmp = tmp_path_factory.mktemp("e2e")
    db, ids = _build_database(tmp)
    with label_serve_process(db) as url:
        yield LabelServer(url, db, tmp, ids)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_for(browser):
    """``page_for(name)`` opens a fresh browser context (own cookies); JS errors and dialogs fail the test."""
    contexts = []
    problems: list[str] = []

    def open_page(label: str):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"{label}: page error: {error}"))
        page.on("dialog", lambda dialog: (problems.append(f"{label}: dialog: {dialog.message}"), dialog.dismiss()))
        page.on("console", lambda message: _console_problem(label, message, problems))
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not problems, problems


def _console_problem(label: str, message, problems: list[str]) -> None:
    # Console errors are script errors and Content-Security-Policy violations; a page answered with an
    # error status (an expected 404 here) is also logged as one, and is checked by the tests themselves.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        problems.append(f"{label}: console error: {message.text}")


def shoot(page, name: str) -> None:
    """Save a full-page screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


DEMO_ANSWER = "Plants catch sunlight with their leaves\nand turn it into food."
EDITED_ANSWER = "Plants use sunlight, water and air to make their own food."


def _submit(page, selector: str = "#submit") -> None:
    """Click a button that posts a form and wait for the page it leads to."""
    with page.expect_navigation():
        page.click(selector)


def _login(page, base: str, name: str) -> None:
    page.goto(base)
    assert "/login" in page.url
    page.fill("#username", name)
    page.fill("#secret", SECRETS[name])
    _submit(page, "form.login button[type=submit]")
    assert page.inner_text("#current-user") == name


def _ranking_positions(page) -> list[int]:
    """Canonical response positions in the order the ranking widget shows them, best first."""
    return page.eval_on_selector_all(".rank-item", "items => items.map(li => Number(li.dataset.position))")


def _rank_values(page, k: int) -> list[int]:
    """The form's rank_P fields, which the widget keeps in sync (what the server receives)."""
    return [int(page.input_value(f"select[name=rank_{p}]")) for p in range(k)]


def _letter_of(page, position: int) -> str:
    return page.get_attribute(f".rank-item[data-position='{position}']", "data-letter")


def _rate_all(page, qualities: dict[int, int]) -> None:
    for position, quality in qualities.items():
        page.check(f"#quality-{_letter_of(page, position)}-{quality}")


def _drag_before(page, source_position: int, target_index: int) -> None:
    """Drag one response with the mouse to just above the response now at ``target_index``."""
    page.locator("#ranking").scroll_into_view_if_needed()
    source = page.locator(f".rank-item[data-position='{source_position}']").bounding_box()
    target = page.locator(".rank-item").nth(target_index).bounding_box()
    page.mouse.move(source["x"] + 40, source["y"] + source["height"] / 2)
    page.mouse.down()
    page.mouse.move(target["x"] + 40, target["y"] + 4, steps=8)
    page.mouse.up()


def _keyboard_move_up(page, position: int, steps: int) -> None:
    """Pick a response up with Space, move it with the arrow key, drop it with Space."""
    page.focus(f".rank-item[data-position='{position}']")
    page.keyboard.press("Space")
    for _ in range(steps):
        page.keyboard.press("ArrowUp")
    page.keyboard.press("Space")


def _export(server, kind: str):
    from instructrl.label import export

    path = server.tmp / f"{kind}.jsonl"
    export.run(load_config(export.Config, None, [f"db={server.db}", f"kind={kind}", f"output={path}"]))
    loader = load_comparisons if kind == "comparisons" else load_demonstrations
    records, _ = loader(path)
    return records


def test_label_in_the_browser_then_export(label_server, page_for):
    base = label_server.url
    page = page_for("alice")
    page.goto(base)
    shoot(page, "01-login")
    _login(page, base, "alice")
    assert page.locator("#queue tbody tr").count() == 3
    shoot(page, "02-queue")

    # ---- a demonstration
    with page.expect_navigation():
        page.click("#start-next")
    assert page.inner_text("#prompt-text") == DEMO_PROMPT  # shown as text, tags and all
    page.fill("#response", DEMO_ANSWER)
    shoot(page, "03-demonstration")
    _submit(page)

    # ---- a ranking with the mouse (prompt and a response carry HTML that must stay inert text)
    assert "Submitted." in page.inner_text(".flash")
    assert page.inner_text("#prompt-text") == COMPARE_PROMPTS[0]
    assert page.evaluate("window.__injected") is None
    assert COMPARE_RESPONSES[0][0] in page.inner_text("article.response[data-position='0'] .text")
    assert page.locator("select[name=rank_0]").is_hidden()  # the widget replaces the no-JS rank fields
    target = [3, 1, 0, 2]  # best first, canonical positions
    for index, position in enumerate(target):
        if _ranking_positions(page)[index] != position:
            _drag_before(page, position, index)
    assert _ranking_positions(page) == target
    page.click(".rank-item[data-position='1'] label.tie")  # a tie: 1 is as good as 3 above it
    assert _rank_values(page, 4) == [2, 1, 3, 1]
    _rate_all(page, {0: 3, 1: 6, 2: 1, 3: 6})
    page.check(f"#flag-{_letter_of(page, 2)}-fails_instruction")
    shoot(page, "04-ranked-with-mouse")
    _submit(page)

    # ---- a ranking with the keyboard
    assert page.inner_text("#prompt-text") == COMPARE_PROMPTS[1]
    target = [3, 0, 1, 2]
    for index, position in enumerate(target):
        current = _ranking_positions(page).index(position)
        if current != index:
            _keyboard_move_up(page, position, current - index)
    assert _ranking_positions(page) == target
    assert page.evaluate("document.activeElement.classList.contains('rank-item')")
    page.focus(".rank-item >> nth=1")
    page.keyboard.press("ArrowDown")  # arrows without picking up move the focus...
    page.keyboard.press("t")  # ...and T ties the focused response (1) with the one above (0)
    assert _rank_values(page, 4) == [2, 2, 3, 1]
    assert "tied with the one above" in page.get_attribute(".rank-item[data-position='1']", "aria-label")
    _rate_all(page, {0: 5, 1: 5, 2: 1, 3: 7})
    page.check(f"#flag-{_letter_of(page, 2)}-hallucination")
    shoot(page, "05-ranked-with-keyboard")
    _submit(page)
    assert page.locator("#queue-empty").is_visible()
    shoot(page, "06-queue-done")

    # ---- the export holds exactly what was entered, in the training formats
    (demo,) = _export(label_server, "demonstrations")
    assert (demo.prompt, demo.response, demo.meta["labeler_id"]) == (DEMO_PROMPT, DEMO_ANSWER, "alice")
    first, second = _export(label_server, "comparisons")
    assert first.responses == tuple(COMPARE_RESPONSES[0]) and second.responses == tuple(COMPARE_RESPONSES[1])
    assert first.ranking == ((1, 3), 0, 2) and first.n_pairs == 5
    assert second.ranking == (3, (0, 1), 2)
    assert [r["quality"] for r in first.meta["ratings"]] == [3, 6, 1, 6]
    assert [r["fails_instruction"] for r in first.meta["ratings"]] == [False, False, True, False]
    assert [r["hallucination"] for r in second.meta["ratings"]] == [False, False, True, False]
    assert first.meta["labeler_id"] == second.meta["labeler_id"] == "alice"

    # ---- edit past work from the history
    with page.expect_navigation():
        page.click("text=History")
    with page.expect_navigation():
        page.click("#history >> text=Edit >> nth=-1")  # the oldest entry: the demonstration
    assert page.input_value("#response") == DEMO_ANSWER
    page.fill("#response", EDITED_ANSWER)
    _submit(page)
    assert "Changes saved." in page.inner_text(".flash")
    (demo,) = _export(label_server, "demonstrations")
    assert demo.response == EDITED_ANSWER
    shoot(page, "07-after-edit")


def test_other_labelers_and_admin_pages(label_server, page_for):
    base = label_server.url
    alice_items = label_server.assignment_ids["alice"]
    bob = page_for("bob")
    _login(bob, base, "bob")
    assert bob.locator("#queue-empty").is_visible()
    for assignment_id in alice_items:
        response = bob.goto(f"{base}task/{assignment_id}")
        assert response.status == 404
        assert bob.inner_text("h1") == "Not found"
        assert DEMO_PROMPT not in bob.content() and COMPARE_PROMPTS[1] not in bob.content()
    shoot(bob, "08-other-labeler-404")
    assert bob.goto(f"{base}admin").status == 403

    boss = page_for("boss")
    _login(boss, base, "boss")
    with boss.expect_navigation():
        boss.click("text=Admin")
    rows = {r.split("\t")[0]: r.split("\t") for r in boss.locator("#labelers tbody tr").all_inner_texts()}
    assert rows["bob"][2:6] == ["Both, alternating", "0", "0", "0"]
    assert int(rows["alice"][4]) + int(rows["alice"][3]) == 3  # pending + done: nothing lost
    with boss.expect_navigation():
        boss.click("text=Agreement between labelers")
    assert "Overall: n/a" in boss.inner_text("#overall-agreement")  # no item was given to two labelers
    shoot(boss, "09-admin")


IDLE_MINUTES = 0.1
"""The expiry test's idle limit: a login ends 6 s after its last request (long enough to log in and submit)."""


def _storage_keys(page) -> list[str]:
    return page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('instructrl-draft:'))")


def test_typed_work_survives_an_expired_login_and_is_submitted_after_it(tmp_path, page_for):
    """A demonstration, a ranking with scores and flags, and a skip reason with its note, all typed while the
    login runs out: each submission leads to the login page, and after logging in the task page brings the
    typed values back (kept in the browser), ready to submit. Drafts are gone once the server stored the work."""
    import time

    db, ids = _build_database(tmp_path)
    demo_id, ranking_id, skip_id = ids["alice"]
    with label_serve_process(db, f"idle_minutes={IDLE_MINUTES}") as base:
        page = page_for("alice")
        _login(page, base, "alice")
        page.goto(f"{base}task/{demo_id}")
        page.fill("#response", DEMO_ANSWER)
        ranking = page.context.new_page()
        ranking.goto(f"{base}task/{ranking_id}")
        target = [2, 0, 3, 1]
        for index, position in enumerate(target):
            current = _ranking_positions(ranking).index(position)
            if current != index:
                _keyboard_move_up(ranking, position, current - index)
        _rate_all(ranking, {0: 6, 1: 2, 2: 7, 3: 4})
        ranking.check(f"#flag-{_letter_of(ranking, 1)}-hallucination")
        skip = page.context.new_page()
        skip.goto(f"{base}task/{skip_id}")
        skip.click("details.skip summary")
        skip.select_option("#skip-reason", "other")
        skip.fill("#skip-note", "The prompt names a product I do not know.")

        time.sleep(IDLE_MINUTES * 60 + 1)  # the login expires while the labeler types
        for tab, selector in [(page, "#submit"), (ranking, "#submit"), (skip, "#skip-form button[type=submit]")]:
            _submit(tab, selector)
            assert "/login" in tab.url and "what you typed is kept in this browser" in tab.inner_text(".flash")

        page.fill("#username", "alice")
        page.fill("#secret", SECRETS["alice"])
        _submit(page, "form.login button[type=submit]")  # back to the task, the text restored
        assert page.url == f"{base}task/{demo_id}" and page.input_value("#response") == DEMO_ANSWER
        _submit(page)
        assert "Submitted." in page.inner_text(".flash")
        assert not any(key.endswith(f":{demo_id}:label-form") for key in _storage_keys(page))

        ranking.goto(f"{base}task/{ranking_id}")  # the same browser, now logged in again
        assert _ranking_positions(ranking) == target and _rank_values(ranking, 4) == [2, 4, 1, 3]
        assert ranking.is_checked(f"#quality-{_letter_of(ranking, 2)}-7")
        assert ranking.is_checked(f"#flag-{_letter_of(ranking, 1)}-hallucination")
        _submit(ranking)
        skip.goto(f"{base}task/{skip_id}")
        assert skip.input_value("#skip-reason") == "other"
        assert skip.input_value("#skip-note") == "The prompt names a product I do not know."
        _submit(skip, "#skip-form button[type=submit]")
        assert _storage_keys(skip) == []  # every draft was dropped once its work was stored

    (demo,) = _export(LabelServer("", db, tmp_path, ids), "demonstrations")
    assert demo.response == DEMO_ANSWER
    (comparison,) = _export(LabelServer("", db, tmp_path, ids), "comparisons")
    assert comparison.ranking == (2, 0, 3, 1)
    assert [r["quality"] for r in comparison.meta["ratings"]] == [6, 2, 7, 4]
    assert [r["hallucination"] for r in comparison.meta["ratings"]] == [False, True, False, False]
    assert assignment_outcome(db, skip_id) == ("skipped", "other", "The prompt names a product I do not know.")


def test_pages_fit_a_phone_screen(label_server, browser):
    """At 390 px (a phone held upright) no page scrolls sideways: the response cards take the screen's width."""
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        _login(page, label_server.url, "alice")
        for assignment_id in label_server.assignment_ids["alice"]:
            page.goto(f"{label_server.url}task/{assignment_id}")
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"task {assignment_id} is {overflow} px wider than the screen"
        shoot(page, "10-phone-ranking")
        for path in ("", "history"):
            page.goto(label_server.url + path)
            assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0, path
    finally:
        context.close()
