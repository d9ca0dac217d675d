"""Any :class:`instructrl.world.World`: the loader, the example world in examples/, and the pipeline run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from instructrl.config import ConfigError, changed_keys, load_config
from instructrl.eval.report import HeadlineRow
from instructrl.eval.run import mark_rows_needing_a_world
from instructrl.sandbox import SandboxWorld
from instructrl.world import SPLITS, STAGE_SHARES, Task, World, WorldError, load_world, stage_tasks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shop_world.py"
EXAMPLE_SPEC = f"{EXAMPLE}:make_world"


@pytest.fixture
def no_sandbox(monkeypatch):
    """Any construction of the sandbox world fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("SandboxWorld was constructed in a run on another world")

    monkeypatch.setattr(SandboxWorld, "__init__", refuse)


@pytest.fixture(scope="module")
def shop() -> World:
    return load_world(EXAMPLE_SPEC, seed=0)


def test_sandbox_is_the_default_world():
    assert isinstance(load_world("sandbox", seed=3), SandboxWorld)
    assert load_world("sandbox", seed=3).seed == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples/shop_world.py", "is not a world; expected 'sandbox'"),
        ("no/such/file.py:make_world", "no such file no/such/file.py"),
        (f"{EXAMPLE}:no_such_factory", "has no callable 'no_such_factory'"),
        ("instructrl.no_such_module:make", "cannot import instructrl.no_such_module"),
        ("json:make_world", "json has no callable 'make_world'"),
    ],
)
def test_a_bad_world_spec_fails_naming_the_setting(spec, message):
    with pytest.raises(WorldError, match="run.world") as e:
        load_world(spec)
    assert message in str(e.value)


def test_an_object_lacking_protocol_methods_is_refused(tmp_path):
    path = tmp_path / "half_world.py"
    path.write_text(
        "class Half:\n    def tasks(self, split):\n        return []\n\ndef make(seed):\n    return Half()\n"
    )
    with pytest.raises(WorldError, match="lacks the World method") as e:
        load_world(f"{path}:make", setting="world")
    assert str(e.value).startswith("world: ")
    for method in ("demonstrate", "rank", "gold_score", "labelers", "pretraining_corpus"):
        assert method in str(e.value)


def test_a_stage_refuses_a_bad_world_up_front():
    from instructrl.stages import sft

    with pytest.raises(ConfigError, match="run.world: 'nonsense' is not a world"):
        load_config(sft.Config, None, ["run.world=nonsense"])
    cfg = load_config(sft.Config, None, [f"world={EXAMPLE_SPEC}"])  # the old top-level spelling of run settings
    assert cfg.run.world == EXAMPLE_SPEC


def test_a_run_saved_before_the_world_setting_still_resumes():
    from instructrl.stages import sft

    cfg = load_config(sft.Config, None, [])
    saved = json.loads(json.dumps(cfg, default=lambda o: o.__dict__))
    del saved["run"]["world"]
    assert "run.world" not in changed_keys(saved, cfg)
    assert "run.world" in changed_keys(saved, load_config(sft.Config, None, [f"run.world={EXAMPLE_SPEC}"]))


def test_the_example_world_keeps_the_protocol(shop):
    assert isinstance(shop, World) and not isinstance(shop, SandboxWorld)
    splits = {split: shop.tasks(split) for split in SPLITS}
    users = {split: {t.user_id for t in tasks} for split, tasks in splits.items()}
    assert all(splits.values()) and not (users["train"] & users["test"]) and not (users["valid"] & users["test"])
    pools = [{t.id for t in stage_tasks(shop, stage)} for stage in STAGE_SHARES]
    assert sum(map(len, pools)) == len(splits["train"]) and not (pools[0] & pools[1] or pools[1] & pools[2])
    rng = np.random.default_rng(0)
    task = next(t for t in splits["train"] if t.category == "price")
    demos = {shop.demonstrate(task, labeler, rng) for labeler in shop.labelers()}
    assert len(demos) >= 2 and all(d.startswith(" ") for d in demos)  # labelers' habits differ
    best, worst = shop.reference_response(task), " sure , take it ."
    assert shop.gold_score(task, best) > shop.gold_score(task, best + " and more" * 10) > shop.gold_score(task, worst)
    ranking = shop.rank(task, [worst, best], 0, rng)
    flat = [i for e in ranking for i in (e if isinstance(e, tuple) else (e,))]
    assert sorted(flat) == [0, 1] and ranking[0] == 1
    assert shop.pretraining_corpus(5, "train") != shop.pretraining_corpus(5, "valid")
    assert shop.pretraining_corpus(5) == load_world(EXAMPLE_SPEC, seed=0).pretraining_corpus(5)  # a pure function


def test_data_files_of_the_example_world_read_no_sandbox(tmp_path, no_sandbox):
    from instructrl.sandbox import make

    out = tmp_path / "data"
    cfg = load_config(make.Config, None, [f"output_dir={out}", f"world={EXAMPLE_SPEC}", "corpus_docs=50"])
    summary = make.run(cfg)
    assert summary["demonstrations"] > 0 and summary["comparisons"] > 0
    comparison = json.loads((out / "comparisons.jsonl").read_text().splitlines()[0])
    assert comparison["prompt"].startswith("Customer: ") and len(comparison["responses"]) >= 4
    assert 0.0 < json.loads((out / "agreement.json").read_text())["mean"] <= 1.0
    assert (out / "heldout.jsonl").is_file()  # the example world has the heldout_text extra


def test_report_rows_a_world_cannot_compute_say_what_they_need(shop):
    rows = [HeadlineRow(i, "claim", None, None, None, "%", 1, "paper") for i in ("1b", "3a", "5a")]
    marked = {row.id: row.note for row in mark_rows_needing_a_world(rows, shop)}
    assert marked == {"1b": "", "3a": "", "5a": marked["5a"]} and "needs a world with analysis()" in marked["5a"]
    no_world = {row.id: row.note for row in mark_rows_needing_a_world(rows)}
    assert no_world["1b"] == "needs a world (the labeler judge)"


@pytest.mark.slow  # ~4 min on a shared 2-core CPU (the whole quick pipeline, like tests/test_demo.py's run)
def test_quick_demo_on_the_example_world_reports_row_1_by_its_gold_judge(tmp_path, no_sandbox):
    from instructrl.cli import main

    out = tmp_path / "run"
    assert main(["demo", "--quick", "--set", f"world={EXAMPLE_SPEC}", "--set", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = {row["id"]: row for row in metrics["headline"]}
    assert rows["1"]["claim"].endswith("(gold judge)") and rows["1"]["value"] is not None
    assert "ceiling" in rows["1"]["note"]  # the reference_response extra
    assert "needs a world with analysis()" in rows["5a"]["note"]
    assert metrics["info"]["world"].startswith(f"world {EXAMPLE_SPEC} (seed 0)")
    shop = load_world(EXAMPLE_SPEC, seed=0)
    for sample in metrics["samples"]:  # the gold scores are the shop's
        task = Task("any", sample["prompt"], sample["category"], "plain", "", "test")
        for name, response in sample["responses"].items():
            assert sample["gold"][name] == pytest.approx(shop.gold_score(task, response), abs=1e-3)
    rm_comparisons = (out / "rm" / "sandbox_comparisons.jsonl").read_text().splitlines()
    assert json.loads(rm_comparisons[0])["prompt"].startswith("Customer: ")  # SFT samples ranked by shop labelers


def test_the_demo_refuses_a_bad_world_before_any_stage(tmp_path, capsys):
    from instructrl.cli import main

    assert main(["demo", "--quick", "--set", "world=no/such.py:make", "--set", f"output_dir={tmp_path / 'run'}"]) != 0
    assert "world: 'no/such.py:make': no such file no/such.py" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
