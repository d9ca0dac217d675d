"""Admin commands of the labeling tool: create-labeler, load-prompts, add-samples, assign, export, stats."""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections import Counter

import pytest
from sqlalchemy import func, select
from werkzeug.security import check_password_hash

from instructrl.config import ConfigError, field_docs, load_config
from instructrl.data.loading import load_comparisons, load_demonstrations
from instructrl.errors import DataError, UserFacingError
from instructrl.label import add_samples, assign, auth, create_labeler, export, load_prompts, serve, stats
from instructrl.label.db import Assignment, Item, Labeler, LoginSession, Prompt, open_database
from instructrl.label.forms import SubmissionMeta, parse_ranking
from instructrl.label.tasks import (
    add_comparison_item,
    owned_assignment,
    skip_assignment,
    submit_demonstration,
    submit_ranking,
)

CHEAP_HASH = "scrypt:1024:8:1"


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch):
    """Hash secrets with a small scrypt cost (production: ``auth.SECRET_HASH_METHOD``, 0.1 s per hash)."""
    monkeypatch.setattr(auth, "SECRET_HASH_METHOD", CHEAP_HASH)


COMMAND_MODULES = ["create_labeler", "load_prompts", "add_samples", "assign", "export", "stats", "serve"]


def _cfg(module, db, **values):
    """A validated config built the way the CLI builds it (``--set key=value`` strings)."""
    overrides = [f"db={db}"] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return load_config(module.Config, None, overrides)


def _write_prompts(path, prompts):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(prompts):
            f.write(json.dumps({"prompt": text, "user_id": f"u{i % 3}", "type": "plain"}) + "\n")
    return path


def _key(n: int) -> str:
    return f"{n:032x}"


def _ranking_form(ranks, quality=None, flags=None):
    from werkzeug.datastructures import MultiDict

    form = MultiDict()
    for p, rank in enumerate(ranks):
        form.add(f"rank_{p}", str(rank))
        form.add(f"quality_{p}", str((quality or [4] * len(ranks))[p]))
        for flag in (flags or {}).get(p, ()):
            form.add(f"flag_{p}", flag)
    return form


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_every_command_module_has_a_documented_config_and_run(name):
    module = importlib.import_module(f"instructrl.label.{name}")
    assert callable(module.run)
    docs = field_docs(module.Config)
    assert {f.name for f in dataclasses.fields(module.Config)} == set(docs)
    assert "db" in docs


def test_db_is_required(tmp_path):
    with pytest.raises(ConfigError, match="db"):
        load_config(stats.Config, None, [])


# --------------------------------------------------------------------------- create-labeler


def test_create_labeler_stores_only_a_hash_and_prints_the_secret_once(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # the production hash cost
    db_path = tmp_path / "l.sqlite"
    out = create_labeler.run(_cfg(create_labeler, db_path, username="Alice"))
    printed = capsys.readouterr().out
    assert out["created"] and out["username"] == "alice" and out["role"] == "labeler"
    assert out["secret"] in printed and len(out["secret"]) >= 24
    with open_database(db_path) as db, db.read() as s:
        labeler = s.scalar(select(Labeler))
        assert labeler.secret_hash != out["secret"] and out["secret"] not in labeler.secret_hash
        assert check_password_hash(labeler.secret_hash, out["secret"])
        assert labeler.secret_hash.startswith("scrypt:32768:8:1$")
        assert labeler.secret_expires_at is not None


def test_create_labeler_refuses_silent_secret_change_and_rotates_on_request(tmp_path):
    db_path = tmp_path / "l.sqlite"
    first = create_labeler.run(_cfg(create_labeler, db_path, username="bob", secret="first-secret-123"))
    assert first["secret"] == "first-secret-123"
    with pytest.raises(UserFacingError, match="rotate=true"):
        create_labeler.run(_cfg(create_labeler, db_path, username="bob", secret="other-secret-123"))
    with open_database(db_path) as db, db.write() as s:
        s.add(LoginSession(token_hash="t" * 64, labeler_id=1, csrf_token="c", created_at=_now(), expires_at=_now(),
                           last_seen_at=_now()))  # fmt: skip
    rotated = create_labeler.run(_cfg(create_labeler, db_path, username="bob", rotate=True))
    assert rotated["secret"] not in (None, "first-secret-123")
    with open_database(db_path) as db, db.read() as s:
        labeler = s.scalar(select(Labeler))
        assert check_password_hash(labeler.secret_hash, rotated["secret"])
        assert s.scalar(select(func.count()).select_from(LoginSession)) == 0  # rotation ends sessions
    # changing only the role keeps the secret; a later change of another field keeps the role
    again = create_labeler.run(_cfg(create_labeler, db_path, username="bob", role="admin"))
    assert again["secret"] is None and not again["created"] and again["role"] == "admin"
    disabled = create_labeler.run(_cfg(create_labeler, db_path, username="bob", active=False))
    assert (disabled["role"], disabled["active"]) == ("admin", False)
    enabled = create_labeler.run(_cfg(create_labeler, db_path, username="bob", active=True))
    assert (enabled["role"], enabled["active"]) == ("admin", True)


def test_create_labeler_sets_the_kind_of_work(tmp_path):
    db_path = tmp_path / "l.sqlite"
    assert create_labeler.run(_cfg(create_labeler, db_path, username="ana"))["work"] == "mixed"
    assert create_labeler.run(_cfg(create_labeler, db_path, username="ana", work="comparison"))["work"] == "comparison"
    assert create_labeler.run(_cfg(create_labeler, db_path, username="ana", active=False))["work"] == "comparison"
    with pytest.raises(ConfigError, match="work"):
        _cfg(create_labeler, db_path, username="ana", work="everything")


@pytest.mark.parametrize("username", ["a", "has space", "x" * 65, "-dash", "émile", "a/b"])
def test_create_labeler_rejects_bad_usernames(tmp_path, username):
    with pytest.raises(UserFacingError, match="invalid username"):
        create_labeler.run(_cfg(create_labeler, tmp_path / "l.sqlite", username=username))


def test_create_labeler_rejects_short_secret(tmp_path):
    with pytest.raises(UserFacingError, match="12 to 256"):
        create_labeler.run(_cfg(create_labeler, tmp_path / "l.sqlite", username="carl", secret="short"))


def _now():
    from instructrl.label.db import utcnow

    return utcnow()


# --------------------------------------------------------------------------- load-prompts


def test_load_prompts_makes_demonstration_items_and_skips_duplicates(tmp_path):
    db_path = tmp_path / "l.sqlite"
    path = _write_prompts(tmp_path / "train.jsonl", ["p one", "p two", "p one"])
    out = load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path)))
    assert (out["added"], out["duplicates"], out["items"]) == (2, 1, 2)
    again = load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path)))
    assert (again["added"], again["duplicates"]) == (0, 3)
    comparison = load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path), task="comparison"))
    assert (comparison["added"], comparison["items"]) == (2, 0)  # same texts, other task: new prompts, no items
    with open_database(db_path) as db, db.read() as s:
        prompt = s.scalar(select(Prompt).order_by(Prompt.id))
        assert (prompt.user_id, prompt.meta) == ("u0", {"type": "plain"})
        assert Counter(s.scalars(select(Item.kind))) == {"demonstration": 2}


def test_load_prompts_reports_bad_and_long_prompts(tmp_path):
    db_path = tmp_path / "l.sqlite"
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{"prompt": "' + "y" * 50 + '"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path)))
    path.write_text('{"prompt": "ok"}\n{"prompt": "' + "y" * 50 + '"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="max_prompt_chars"):
        load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path), max_prompt_chars=20))
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{"prompt": "' + "y" * 50 + '"}\n', encoding="utf-8")
    out = load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path), max_prompt_chars=20, skip_bad=True))
    assert (out["added"], out["skipped_bad"], out["skipped_too_long"]) == (1, 1, 1)


def test_load_prompts_needs_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match="prompts"):
        _cfg(load_prompts, tmp_path / "l.sqlite", prompts=str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- add-samples


def test_add_samples_generates_k_responses_per_comparison_prompt(tmp_path, tiny_lm_dir):
    db_path = tmp_path / "l.sqlite"
    path = _write_prompts(
        tmp_path / "rm.jsonl", ["Instruction: what is 2 plus 3 ?\nResponse:", "Q: what is 1 plus 1 ?"]
    )
    load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path), task="comparison"))
    load_prompts.run(_cfg(load_prompts, db_path, prompts=str(path)))  # demonstration prompts: never sampled
    cfg = _cfg(add_samples, db_path, model=str(tiny_lm_dir), k=4, k_max=6, max_new_tokens=8, seed=3)
    out = add_samples.run(cfg)
    assert out["items"] == 2
    with open_database(db_path) as db, db.read() as s:
        items = s.scalars(select(Item).where(Item.kind == "comparison").order_by(Item.id)).all()
        ks = [len(item.responses) for item in items]
        # K drawn per prompt; a response still empty after the retries is dropped, so K can come out lower
        assert all(2 <= k <= add_samples.choose_k(cfg, item.prompt_id) for k, item in zip(ks, items))
        assert out["responses"] == sum(ks) and all(r.text.strip() for item in items for r in item.responses)
        assert {r.model for item in items for r in item.responses} == {str(tiny_lm_dir)}
        assert [r.position for r in items[0].responses] == list(range(ks[0]))
        assert all(item.prompt.task == "comparison" for item in items)
    assert add_samples.run(cfg)["items"] == 0  # every prompt has its item now
    assert add_samples.run(dataclasses.replace(cfg, resample=True, limit=1))["items"] == 1


def test_sample_non_empty_resamples_only_the_empty_responses():
    scripted = {
        0: ["a-0", "", "", "", "c-0", "", "c-1"],  # for prompts a, a, b, b, c, c, c
        1: ["a-1", "", "", "c-2"],  # for the four still empty: a, b, b, c
        2: ["", " \n"],  # b, b stay empty
    }
    calls = []

    def fake_sample(prompts, attempt):
        calls.append(list(prompts))
        return scripted[attempt]

    out = add_samples.sample_non_empty(fake_sample, ["a", "b", "c"], [2, 2, 3], retries=2)
    assert calls == [["a", "a", "b", "b", "c", "c", "c"], ["a", "b", "b", "c"], ["b", "b"]]
    assert out == [["a-0", "a-1"], [], ["c-0", "c-2", "c-1"]]
    calls.clear()
    assert add_samples.sample_non_empty(fake_sample, ["a", "b", "c"], [2, 2, 3], retries=0)[0] == ["a-0"]
    assert len(calls) == 1


def test_add_samples_shows_and_reports_characters_labelers_may_not_type(tmp_path, tiny_lm_dir, monkeypatch, capsys):
    """Samples with control characters or U+FFFD (a token cut inside a character) are held to the web form's
    rules: stored with visible marks in their place, and the replacements are reported."""
    from types import SimpleNamespace

    import instructrl.eval.generate

    def fake_generate(model, tokenizer, prompts, **kwargs):
        texts = ["ok", "colour\x1b[31m red", "caf\ufffd\ufffd", "nul\x00 and\r\nbreak"]
        return [SimpleNamespace(text=texts[i % 4]) for i in range(len(prompts))]

    monkeypatch.setattr(instructrl.eval.generate, "generate_responses", fake_generate)
    db_path = tmp_path / "l.sqlite"
    load_prompts.run(_cfg(load_prompts, db_path, prompts=str(_write_prompts(tmp_path / "p.jsonl", ["a prompt"])),
                          task="comparison"))  # fmt: skip
    out = add_samples.run(_cfg(add_samples, db_path, model=str(tiny_lm_dir), k=4))
    assert out["replaced"] == {"control": 2, "U+FFFD": 2, "responses": 3}
    assert "3 sampled responses held characters labelers may not type" in capsys.readouterr().out
    with open_database(db_path) as db, db.read() as s:
        texts = [r.text for r in s.scalars(select(Item)).one().responses]
    assert texts == ["ok", "colour\u241b[31m red", "caf\u2370\u2370", "nul\u2400 and\nbreak"]
    with open_database(db_path) as db, db.write() as s, pytest.raises(ValueError, match="control characters"):
        add_comparison_item(s, 1, ["fine", "raw\x00"])  # unsanitized text never enters the database


def test_empty_responses_never_enter_the_database(tmp_path):
    db_path = _world(tmp_path, n_demo=0, n_comp=1, labelers=())
    with open_database(db_path) as db, db.write() as s, pytest.raises(ValueError, match="empty"):
        add_comparison_item(s, 1, ["fine", " \n "])


def test_add_samples_validates_k(tmp_path, tiny_lm_dir):
    for bad in [{"k": 1}, {"k": 10}, {"k": 5, "k_max": 4}, {"temperature": 0.0}]:
        with pytest.raises(ConfigError):
            _cfg(add_samples, tmp_path / "l.sqlite", model=str(tiny_lm_dir), **bad)


def test_choose_k_is_uniform_over_the_range_and_stable():
    cfg = add_samples.Config(db="x", model="m", k=4, k_max=9)
    draws = [add_samples.choose_k(cfg, pid) for pid in range(600)]
    assert set(draws) == set(range(4, 10))
    assert max(Counter(draws).values()) < 150  # about 100 each
    assert draws == [add_samples.choose_k(cfg, pid) for pid in range(600)]
    assert add_samples.choose_k(add_samples.Config(db="x", model="m", k=5), 7) == 5


# --------------------------------------------------------------------------- assign


def _world(tmp_path, n_demo=4, n_comp=6, labelers=("alice", "bob", "carol"), k=4):
    """A database with labelers, demonstration items and comparison items (no assignments)."""
    db_path = tmp_path / "l.sqlite"
    for name in labelers:
        create_labeler.run(_cfg(create_labeler, db_path, username=name, secret=f"{name}-secret-123"))
    create_labeler.run(_cfg(create_labeler, db_path, username="boss", role="admin", secret="boss-secret-123"))
    if n_demo:
        demo = _write_prompts(tmp_path / "demo.jsonl", [f"demo prompt {i}" for i in range(n_demo)])
        load_prompts.run(_cfg(load_prompts, db_path, prompts=str(demo)))
    if n_comp:
        comp = _write_prompts(tmp_path / "comp.jsonl", [f"compare prompt {i}" for i in range(n_comp)])
        load_prompts.run(_cfg(load_prompts, db_path, prompts=str(comp), task="comparison"))
        with open_database(db_path) as db, db.write() as s:
            for pid in s.scalars(select(Prompt.id).where(Prompt.task == "comparison").order_by(Prompt.id)):
                add_comparison_item(s, pid, [f"response {j} to {pid}" for j in range(k)], ["m"] * k)
    return db_path


def test_plan_assignments_overlap_and_balance():
    plan = assign.plan_assignments(list(range(100)), ["a", "b", "c", "d"], 0.2, 3, seed=1)
    sizes = Counter(len(names) for _, names in plan)
    assert sizes == {1: 80, 3: 20}
    assert all(len(set(names)) == len(names) for _, names in plan)
    load = Counter(name for _, names in plan for name in names)
    assert max(load.values()) - min(load.values()) <= 1  # 140 assignments over 4 labelers: 35 each
    assert plan == assign.plan_assignments(list(range(100)), ["a", "b", "c", "d"], 0.2, 3, seed=1)
    assert plan != assign.plan_assignments(list(range(100)), ["a", "b", "c", "d"], 0.2, 3, seed=2)


def test_plan_assignments_counts_existing_pending_work():
    plan = assign.plan_assignments([1, 2, 3, 4], ["a", "b"], 0.0, 2, seed=0, pending={"a": 4})
    assert [names for _, names in plan] == [["b"]] * 4


def test_plan_assignments_with_few_labelers():
    with pytest.raises(UserFacingError, match="no labelers"):
        assign.plan_assignments([1], [], 0.0, 2, seed=0)
    plan = assign.plan_assignments(list(range(10)), ["a", "b"], 0.5, 3, seed=0)  # overlap items go to both
    assert Counter(len(names) for _, names in plan) == {1: 5, 2: 5}
    plan = assign.plan_assignments(list(range(10)), ["a"], 0.5, 2, seed=0)  # one labeler: no overlap
    assert [names for _, names in plan] == [["a"]] * 10


def test_assign_gives_items_to_labelers_with_random_display_orders(tmp_path):
    db_path = _world(tmp_path, n_demo=10, n_comp=10, k=6)
    out = assign.run(_cfg(assign, db_path, overlap_fraction=0.5, overlap_labelers=2, seed=4))
    assert (out["items"], out["overlap_items"], out["assignments"]) == (20, 10, 30)
    assert set(out["per_labeler"]) == {"alice", "bob", "carol"}  # admins are not labelers by default
    with open_database(db_path) as db, db.read() as s:
        rows = s.scalars(select(Assignment)).all()
        orders = [a.display_order for a in rows if a.item.kind == "comparison"]
        assert all(sorted(order) == list(range(6)) for order in orders)
        assert len({tuple(o) for o in orders}) > 1  # shuffled, not all the same order
        assert all(a.display_order is None for a in rows if a.item.kind == "demonstration")
        assert all(a.status == "pending" for a in rows)
    assert assign.run(_cfg(assign, db_path))["items"] == 0  # nothing left to assign


def test_assign_to_named_labelers_and_kind(tmp_path):
    db_path = _world(tmp_path, n_demo=3, n_comp=3)
    out = assign.run(_cfg(assign, db_path, labelers=["bob"], kind="comparison", overlap_fraction=0.0))
    assert out["per_labeler"] == {"bob": 3}
    with pytest.raises(UserFacingError, match="unknown labelers: zed"):
        assign.run(_cfg(assign, db_path, labelers=["zed"]))
    create_labeler.run(_cfg(create_labeler, db_path, username="bob", active=False))
    with pytest.raises(UserFacingError, match="inactive labelers: bob"):
        assign.run(_cfg(assign, db_path, labelers=["bob"]))


# --------------------------------------------------------------------------- export and stats


def _label_everything(db_path):
    """Every labeler submits all their work: rankings reverse the canonical order except carol's first."""
    with open_database(db_path) as db, db.write() as s:
        for n, a in enumerate(s.scalars(select(Assignment).order_by(Assignment.id)).all()):
            a = owned_assignment(s, a.labeler_id, a.id)
            if a.item.kind == "demonstration":
                submit_demonstration(s, a, f"answer by {a.labeler.username}", SubmissionMeta(_key(n), None))
            else:
                k = len(a.item.responses)
                ranks = list(range(k, 0, -1))
                if a.labeler.username == "carol":
                    ranks[0], ranks[1] = ranks[1], ranks[0]
                if a.labeler.username == "bob":
                    ranks[k - 1] = ranks[k - 2]  # bob ties the two best
                form = _ranking_form(ranks, quality=[1 + p for p in range(k)], flags={0: ["hallucination"]})
                submit_ranking(s, a, parse_ranking(form, k), SubmissionMeta(_key(n), None))


def test_export_round_trips_through_the_training_loaders(tmp_path):
    db_path = _world(tmp_path, n_demo=4, n_comp=6)
    assign.run(_cfg(assign, db_path, overlap_fraction=0.5, overlap_labelers=2))
    _label_everything(db_path)
    out_c = export.run(_cfg(export, db_path, kind="comparisons", output=str(tmp_path / "c.jsonl")))
    out_d = export.run(_cfg(export, db_path, kind="demonstrations", output=str(tmp_path / "d.jsonl")))
    comparisons, cstats = load_comparisons(tmp_path / "c.jsonl")
    demos, dstats = load_demonstrations(tmp_path / "d.jsonl")
    assert cstats.n_skipped == dstats.n_skipped == 0
    assert len(comparisons) == out_c["records"] == 6 + 3  # 3 of the 6 comparison items have 2 labelers
    assert len(demos) == out_d["records"] == 4 + 2
    for c in comparisons:
        assert c.responses == tuple(f"response {j} to {c.meta['prompt_id']}" for j in range(4))  # canonical order
        assert c.ranking[0] == ((2, 3) if c.meta["labeler_id"] == "bob" else 3)
        assert [r["quality"] for r in c.meta["ratings"]] == [1, 2, 3, 4]
        assert c.meta["ratings"][0]["hallucination"] and not c.meta["ratings"][1]["hallucination"]
        assert c.meta["models"] == ["m"] * 4
    bob = [c for c in comparisons if c.meta["labeler_id"] == "bob"]
    assert bob and all(c.ranking == ((2, 3), 1, 0) and c.n_pairs == 5 for c in bob)
    assert {d.response for d in demos} <= {f"answer by {n}" for n in ("alice", "bob", "carol")}
    assert all(d.meta["labeler_id"] in d.response for d in demos)
    raw = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert set(raw) >= {"prompt", "responses", "ranking", "labeler_id", "item_id", "ratings", "labeled_at"}


def test_export_leaves_out_skipped_and_pending_work(tmp_path):
    db_path = _world(tmp_path, n_demo=3, n_comp=0, labelers=("alice",))
    assign.run(_cfg(assign, db_path))
    with open_database(db_path) as db, db.write() as s:
        first, second, _third = s.scalars(select(Assignment).order_by(Assignment.id)).all()
        submit_demonstration(s, owned_assignment(s, first.labeler_id, first.id), "done", SubmissionMeta(_key(1), None))
        skip_assignment(s, owned_assignment(s, second.labeler_id, second.id), "unclear", "")
    out = export.run(_cfg(export, db_path, kind="demonstrations", output=str(tmp_path / "d.jsonl")))
    assert out["records"] == 1
    assert export.run(_cfg(export, db_path, kind="comparisons", output=str(tmp_path / "c.jsonl")))["records"] == 0
    assert (tmp_path / "c.jsonl").read_text() == ""


def test_exports_and_stats_files_are_readable_by_the_owner_only(tmp_path):
    import stat

    db_path = _world(tmp_path, n_demo=1, n_comp=1, labelers=("alice",))
    export.run(_cfg(export, db_path, kind="comparisons", output=str(tmp_path / "c.jsonl")))
    stats.run(_cfg(stats, db_path, output=str(tmp_path / "stats.json")))
    for path in (db_path, tmp_path / "c.jsonl", tmp_path / "stats.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_serve_refuses_a_missing_database_unless_asked_to_create_it(tmp_path, monkeypatch):
    import waitress.server

    started = {}

    class FakeServer:  # stands in for Waitress: the test checks what serve asks of it, not the network
        effective_port = 1234

        def run(self):
            started["ran"] = True

        def close(self):
            pass

    monkeypatch.setattr(waitress.server, "create_server", lambda app, **kw: started.update(kw) or FakeServer())
    missing = tmp_path / "typo.sqlite"
    with pytest.raises(UserFacingError, match="does not exist"):
        serve.run(_cfg(serve, missing, port=0))
    assert not missing.exists() and not started
    serve.run(_cfg(serve, missing, port=0, create=True))
    assert missing.is_file() and started["ran"]
    assert started["max_request_body_size"] == 256 * 1024  # the app's form limit, enforced by the server


def test_export_and_stats_need_an_existing_database(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        export.run(_cfg(export, tmp_path / "none.sqlite", kind="comparisons", output=str(tmp_path / "x.jsonl")))
    with pytest.raises(UserFacingError, match="does not exist"):
        stats.run(_cfg(stats, tmp_path / "none.sqlite"))
    with pytest.raises(ConfigError, match="kind"):
        _cfg(export, tmp_path / "l.sqlite", kind="everything", output="x.jsonl")


def test_stats_counts_and_agreement(tmp_path, capsys):
    db_path = _world(tmp_path, n_demo=2, n_comp=4)
    assign.run(_cfg(assign, db_path, overlap_fraction=1.0, overlap_labelers=3))
    _label_everything(db_path)
    out = stats.run(_cfg(stats, db_path, output=str(tmp_path / "stats.json")))
    printed = capsys.readouterr().out
    assert out["items"] == {"demonstration": 2, "comparison": 4}
    assert out["assignments"] == {"pending": 0, "done": 18, "skipped": 0}
    assert out["overlap_items"] == 6
    # per item: alice = reverse order; carol swaps responses 0 and 1 (1 of 6 pairs differs);
    # bob ties responses 2 and 3, so his pairs with anyone drop (2,3): 5 compared, all agree with alice,
    # and 4 of 5 with carol. Per item: alice-bob 5/5, alice-carol 5/6, bob-carol 4/5.
    agreement = out["agreement"]
    assert agreement["n_items"] == 4
    assert agreement["overall"]["agreement"] == pytest.approx((5 + 5 + 4) / 16)
    pairs = {tuple(p["labelers"]): p for p in agreement["pairs"]}
    assert pairs[("alice", "bob")]["agreement"] == 1.0
    assert pairs[("alice", "carol")]["agreement"] == pytest.approx(5 / 6)
    per = {row["username"]: row for row in out["labelers"]}
    assert per["alice"]["done"] == 6 and per["boss"]["agreement"] is None
    assert per["alice"]["agreement"]["agreement"] == pytest.approx(10 / 11)
    assert "87.5%" in printed and "alice / carol: 83.3%" in printed
    assert json.loads((tmp_path / "stats.json").read_text())["assignments"]["done"] == 18


def test_all_tied_rankings_are_counted_in_stats_and_in_the_reward_models_load_report(tmp_path, tiny_tokenizer):
    from instructrl.data.records import Comparison
    from instructrl.stages.rm import encode_comparisons

    db_path = _world(tmp_path, n_demo=0, n_comp=2, labelers=("alice",))
    assign.run(_cfg(assign, db_path))
    with open_database(db_path) as db, db.write() as s:
        first, second = s.scalars(select(Assignment).order_by(Assignment.id)).all()
        tied = _ranking_form([1, 1, 1, 1])
        tied.add("confirm_all_tied", "1")
        submit_ranking(
            s, owned_assignment(s, first.labeler_id, first.id), parse_ranking(tied, 4), SubmissionMeta(_key(1), None)
        )
        ranked = parse_ranking(_ranking_form([1, 2, 3, 3]), 4)
        submit_ranking(s, owned_assignment(s, second.labeler_id, second.id), ranked, SubmissionMeta(_key(2), None))
    out = stats.run(_cfg(stats, db_path))
    assert out["all_tied_rankings"] == 1
    exported = tmp_path / "c.jsonl"
    export.run(_cfg(export, db_path, kind="comparisons", output=str(exported)))
    comparisons, _ = load_comparisons(exported)
    comparisons.append(Comparison("p", ("a", "b" * 200), (0, 1)))  # dropped for length, not for a tie
    _, counts = encode_comparisons(comparisons, tiny_tokenizer, max_prompt_tokens=32, max_response_tokens=16)
    assert (counts.comparisons, counts.dropped_comparisons, counts.all_tied) == (1, 2, 1)


def test_reward_model_trains_on_the_export(tmp_path, tiny_lm_dir):
    """The acceptance path: prompts -> policy samples -> labels -> export -> ``instructrl rm``."""
    rm = pytest.importorskip("instructrl.stages.rm")
    db_path = _world(tmp_path, n_demo=3, n_comp=0, labelers=("alice", "bob"))
    prompts = [f"Instruction: what is {i} plus 2 ?\nResponse:" for i in range(8)]
    load_prompts.run(_cfg(load_prompts, db_path, prompts=str(_write_prompts(tmp_path / "rm.jsonl", prompts)),
                          task="comparison"))  # fmt: skip
    add_samples.run(_cfg(add_samples, db_path, model=str(tiny_lm_dir), k=4, max_new_tokens=6))
    assign.run(_cfg(assign, db_path, overlap_fraction=0.25))
    _label_everything(db_path)
    comparisons = export.run(_cfg(export, db_path, kind="comparisons", output=str(tmp_path / "c.jsonl")))
    demonstrations = export.run(_cfg(export, db_path, kind="demonstrations", output=str(tmp_path / "d.jsonl")))
    overrides = [
        f"model={tiny_lm_dir}",
        f"comparisons={tmp_path / 'c.jsonl'}",
        f"demonstrations={tmp_path / 'd.jsonl'}",
        f"output_dir={tmp_path / 'rm'}",
        "batch_size=4",
        "micro_batch_size=2",
        "valid_fraction=0.25",
        "device=cpu",
    ]
    result = rm.run(load_config(rm.Config, None, overrides))
    data = result["data"]
    assert data["train"]["comparisons"] + data["valid"]["comparisons"] == comparisons["records"] >= 8
    assert data["skipped_records"] == {}
    assert result["normalization"]["n"] == demonstrations["records"]  # the exported demonstrations set the bias
