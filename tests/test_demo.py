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


JUDGE = '''
def longer_wins(prompt, response_a, response_b):
    """A pairwise judge that needs no world: the longer response wins."""
    if len(response_a) == len(response_b):
        return 0.5
    return 1.0 if len(response_a) > len(response_b) else 0.0
'''


def test_eval_on_a_prompts_file_with_a_custom_judge_needs_no_world(quick_demo, tmp_path, monkeypatch):
    """``instructrl eval`` on your own prompts and judge, for the demo's policies: no sandbox is touched, the
    custom judge takes the gold judge's place in the headline and the rows that need a world say so."""
    from instructrl.sandbox.world import SandboxWorld

    def no_sandbox(*args, **kwargs):
        raise AssertionError("eval on a prompts file touched the sandbox")

    monkeypatch.setattr(SandboxWorld, "__init__", no_sandbox)
    judge = tmp_path / "judge.py"
    judge.write_text(JUDGE)
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": f"Instruction: what is {i} plus 1 ?\nResponse:", "category": "sums"} for i in range(5)]
    records += [{"prompt": "Instruction: name a colour .\nResponse:"}] * 2  # a repeat is evaluated once
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    policies = f"{{sft: {quick_demo / 'sft'}, ppo_ptx: {quick_demo / 'ppo_ptx' / 'policy'}}}"
    argv = ["eval", "--set", f"output_dir={out}", "--set", f"policies={policies}", "--set", f"prompts={prompts}"]
    argv += ["--set", f"custom_judge={judge}:longer_wins", "--set", f"reward_model={quick_demo / 'rm'}"]
    assert main(argv + ["--set", "max_new_tokens=8", "--set", "samples=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    judged = {(r["policy"], r["baseline"], r["judge"], r["n"]) for r in metrics["win_rates"]}
    assert judged == {("ppo_ptx", "sft", "custom", 6), ("ppo_ptx", "sft", "rm", 6)}
    assert {r["group"] for r in metrics["breakdowns"]} >= {"category=sums", "category=all", "type=plain"}
    rows = {row["id"]: row for row in metrics["headline"]}
    custom = next(r for r in metrics["win_rates"] if r["judge"] == "custom")
    assert rows["1"]["claim"] == "PPO-ptx vs SFT win rate (custom judge)"
    assert rows["1"]["value"] == round(100 * custom["rate"], 1)
    assert rows["4a"]["value"] is not None  # the reward model's own accuracy needs no world
    for row_id in ("1b", "3a", "3e", "5a", "5c"):
        assert rows[row_id]["value"] is None and rows[row_id]["note"].startswith("needs a world"), row_id
    assert metrics["behaviour"] == [] and metrics["alignment_tax"] == [] and metrics["overoptimization"] == []
    assert metrics["info"]["world"].startswith("none")
    assert "needs a world" in (out / "report.html").read_text()
