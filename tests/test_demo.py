"""``instructrl demo --quick``: the whole pipeline end to end on tiny settings, resumable."""

from __future__ import annotations

import json

import pytest

from conftest import QUICK_DEMO
from instructrl.cli import main


@pytest.fixture(scope="module")
def quick_demo(quick_demo_run):
    return quick_demo_run  # shared with the demo's kill test (tests/test_kill_resume.py)


def test_quick_demo_runs_every_stage_and_writes_the_report(quick_demo):
    stages = ("data", "prepared", "base", "sft", "base_large", "rm", "ppo", "ppo_ptx", "rm_round2", "ppo_ptx_round2")
    for stage in (*stages, "eval"):
        assert (quick_demo / stage).is_dir(), stage
    assert not (quick_demo / "sft_large").exists()  # the larger SFT model is an optional extra (large_sft)
    html = (quick_demo / "eval" / "report.html").read_text()
    assert html.count("<img") >= 2 and "data:image/png;base64," in html
    metrics = json.loads((quick_demo / "eval" / "metrics.json").read_text())
    rows = {row["id"]: row for row in metrics["headline"]}
    # Every headline row is measured by default: row 2 is the small PPO-ptx policy against the larger base model,
    # plain and few-shot prompted, with its size and perplexity beside the small base model's.
    assert [row_id for row_id, row in rows.items() if row["value"] is None] == []
    assert {"1", "1b", "1r", "2", "2b", "4e"} <= set(rows) and "2c" not in rows
    assert all(rows[i]["low"] is not None and rows[i]["high"] is not None for i in ("2", "2b"))
    large = json.loads((quick_demo / "base_large" / "results.json").read_text())
    small = json.loads((quick_demo / "base" / "results.json").read_text())
    assert f"base_large has {large['parameters'] / small['parameters']:.1f}× the parameters" in rows["2"]["note"]
    tax = {t["model"]: t["heldout_perplexity"] for t in metrics["alignment_tax"]}
    assert f"held-out perplexity {tax['base_large']:.3f} (base: {tax['base']:.3f})" in rows["2"]["note"]
    rm_results = json.loads((quick_demo / "rm" / "results.json").read_text())
    assert 0.0 < rm_results["labeler_agreement_on_samples"]["mean"] <= 1.0
    # The reward model ranks the small policy's samples (and by default starts from it too).
    rm_config = (quick_demo / "rm" / "instructrl_rm.yaml").read_text()
    assert f"sandbox_sample_policy: {quick_demo / 'sft'}" in rm_config and "sft_large" not in rm_config
    summary = json.loads((quick_demo / "summary.json").read_text())
    stages = {"pretrain", "sft", "pretrain_large", "rm", "ppo", "ppo_ptx", "rm_round2", "ppo_ptx_round2", "eval"}
    assert set(summary["seconds"]) >= stages and set(summary["cpu_seconds"]) == set(summary["seconds"])


def test_rerunning_the_demo_skips_finished_stages(quick_demo, capsys):
    assert main([*QUICK_DEMO, "--set", f"output_dir={quick_demo}"]) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 11
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert {"pretrain", "pretrain_large", "eval"} <= set(summary["seconds"]) & set(summary["cpu_seconds"])


def _eval_setting(step, key: str) -> str:
    return next(o.split("=", 1)[1] for o in step.overrides if o.startswith(f"{key}="))


@pytest.mark.parametrize("quick", (False, True))
def test_plan_pretrains_a_larger_base_model_and_evaluates_it_plain_and_prompted_by_default(quick):
    from instructrl.demo import Config, plan

    steps = {step.name: step for step in plan(Config(output_dir="r", quick=quick, kl_coef=0.07))}
    assert list(steps) == ["sandbox", "prepare", "pretrain", "sft", "pretrain_large", "rm", "ppo", "ppo_ptx", "eval"]
    large = steps["pretrain_large"].overrides
    assert "tokenizer=r/base" in large  # the RM and policies share token ids
    if not quick:
        assert {"max_steps=300", "model.d_model=256", "model.n_layers=4", "model.n_heads=4"} <= set(large)
        assert not any(o.startswith("run.precision") for o in large)  # no bf16: this CPU has no native bf16
    assert "model=r/sft" in steps["rm"].overrides and "sandbox_sample_policy=r/sft" in steps["rm"].overrides
    assert all("kl.coef=0.07" in steps[name].overrides for name in ("ppo", "ppo_ptx"))
    evaluation = steps["eval"]
    policies = _eval_setting(evaluation, "policies")
    assert "base_large: r/base_large" in policies and "sft_large" not in policies
    assert _eval_setting(evaluation, "prompted") == "[base_large]"
    assert _eval_setting(evaluation, "base_model") == "r/base"


def test_plan_with_the_larger_sft_model_and_the_reward_model_from_it():
    from instructrl.config import ConfigError, load_config
    from instructrl.demo import Config, plan

    steps = {step.name: step for step in plan(Config(output_dir="r", large_sft=True))}
    assert list(steps)[4:7] == ["pretrain_large", "sft_large", "rm"]
    assert "model=r/base_large" in steps["sft_large"].overrides and "model=r/sft" in steps["rm"].overrides
    assert "sft_large: r/sft_large" in _eval_setting(steps["eval"], "policies")
    from_large = {step.name: step for step in plan(Config(output_dir="r", large_sft=True, rm_from_large=True))}
    assert "model=r/sft_large" in from_large["rm"].overrides
    with pytest.raises(ConfigError, match="rm_from_large"):
        load_config(Config, None, ["rm_from_large=true"])


def test_plan_with_a_second_round_of_rankings_on_the_ppo_ptx_policys_samples():
    from instructrl.config import ConfigError, load_config
    from instructrl.demo import Config, plan

    one = {step.name: step for step in plan(Config(output_dir="r"))}
    steps = {step.name: step for step in plan(Config(output_dir="r", rounds=2, round2_prompts=300))}
    assert list(steps)[-4:] == ["ppo_ptx", "rm_round2", "ppo_ptx_round2", "eval"]
    second_rm = set(steps["rm_round2"].overrides)
    # The first round's settings (the same SFT samples, redrawn), then the PPO-ptx policy's samples.
    assert set(one["rm"].overrides) - {"output_dir=r/rm"} <= second_rm and "output_dir=r/rm_round2" in second_rm
    assert {"sandbox_round2_policy=r/ppo_ptx/policy", "sandbox_round2_prompts=300"} <= second_rm
    assert "sandbox_round2_reward_model=r/rm" in second_rm  # measured on its policy's samples: report row 4e
    assert _eval_setting(steps["eval"], "round2_rm_results") == "r/rm_round2/results.json"
    second_ppo = set(steps["ppo_ptx_round2"].overrides)
    assert {"policy=r/sft", "reward_model=r/rm_round2", "output_dir=r/ppo_ptx_round2"} <= second_ppo
    assert set(one["ppo_ptx"].overrides) - second_ppo == {"reward_model=r/rm", "output_dir=r/ppo_ptx"}
    assert "ppo_ptx_round2: r/ppo_ptx_round2/policy" in _eval_setting(steps["eval"], "policies")
    assert "ppo_ptx_round2: r/ppo_ptx_round2" in _eval_setting(steps["eval"], "ppo_runs")
    assert "ppo_ptx_round2" not in _eval_setting(one["eval"], "policies")
    with pytest.raises(ConfigError, match="rounds"):
        load_config(Config, None, ["rounds=3"])


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
