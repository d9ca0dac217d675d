"""``instructrl demo --quick``: the whole pipeline end to end on tiny settings, resumable."""

from __future__ import annotations

import json

import pytest

from instructrl.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--set", f"output_dir={out}"]) == 0
    return out


def test_quick_demo_runs_every_stage_and_writes_the_report(quick_demo):
    for stage in ("data", "prepared", "base", "sft", "rm", "ppo", "ppo_ptx", "eval"):
        assert (quick_demo / stage).is_dir(), stage
    html = (quick_demo / "eval" / "report.html").read_text()
    assert html.count("<img") >= 2 and "data:image/png;base64," in html
    metrics = json.loads((quick_demo / "eval" / "metrics.json").read_text())
    assert metrics["headline"]
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert set(summary["seconds"]) >= {"pretrain", "sft", "rm", "ppo", "ppo_ptx", "eval"}


def test_rerunning_the_demo_skips_finished_stages(quick_demo, capsys):
    assert main(["demo", "--quick", "--set", f"output_dir={quick_demo}"]) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 8
