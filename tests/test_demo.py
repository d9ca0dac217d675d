"""``instructrl demo --quick``: the whole pipeline end to end on tiny settings, resumable."""

from __future__ import annotations

import json

import pytest

from instructrl.cli import main


@pytest.fixture(scope="module")
def quick_demo(quick_demo_run):
    return quick_demo_run  # shared with the demo's kill test (tests/test_kill_resume.py)


def test_quick_demo_runs_every_stage_and_writes_the_report(quick_demo):
    for stage in ("data", "prepared", "base", "sft", "base_large", "sft_large", "rm", "ppo", "ppo_ptx", "eval"):
        assert (quick_demo / stage).is_dir(), stage
    html = (quick_demo / "eval" / "report.html").read_text()
    assert html.count("<img") >= 2 and "data:image/png;base64," in html
    metrics = json.loads((quick_demo / "eval" / "metrics.json").read_text())
    rows = {row["id"]: row for row in metrics["headline"]}
    assert rows["1"]["value"] is not None and rows["2"]["value"] is not None  # vs SFT and vs the larger SFT
    rm_results = json.loads((quick_demo / "rm" / "results.json").read_text())
    assert 0.0 < rm_results["labeler_agreement_on_samples"]["mean"] <= 1.0
    # The reward model ranks the small policy's samples (and by default starts from it too).
    rm_config = (quick_demo / "rm" / "instructrl_rm.yaml").read_text()
    assert f"sandbox_sample_policy: {quick_demo / 'sft'}" in rm_config and "sft_large" not in rm_config
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert set(summary["seconds"]) >= {"pretrain", "sft", "rm", "ppo", "ppo_ptx", "eval"}


def test_rerunning_the_demo_skips_finished_stages(quick_demo, capsys):
    assert main(["demo", "--quick", "--set", f"output_dir={quick_demo}", "--set", "large_model=true"]) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 10


def test_plan_places_the_larger_model_and_the_reward_model_init():
    from instructrl.demo import Config, plan

    steps = {step.name: step for step in plan(Config(output_dir="r", kl_coef=0.07, large_model=True))}
    assert list(steps)[4:7] == ["pretrain_large", "sft_large", "rm"]
    assert "tokenizer=r/base" in steps["pretrain_large"].overrides  # the RM and policies share token ids
    assert "model=r/sft" in steps["rm"].overrides and "sandbox_sample_policy=r/sft" in steps["rm"].overrides
    assert all("kl.coef=0.07" in steps[name].overrides for name in ("ppo", "ppo_ptx"))
    from_large = {step.name: step for step in plan(Config(output_dir="r", large_model=True, rm_from_large=True))}
    assert "model=r/sft_large" in from_large["rm"].overrides
    without = [step.name for step in plan(Config(output_dir="r"))]
    assert "pretrain_large" not in without and "sft_large" not in without
