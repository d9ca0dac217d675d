"""PPO's guardrails against reward hacking: each measurement against a naive reference, each check's threshold,
the start-up warnings, and tiny PPO runs in which a reward that pays for one repeated output trips the checks
(and stops the run with ``guardrails.stop``) while a reward with nothing to exploit does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl.config import ConfigError
from instructrl.stages import ppo
from instructrl.stages.ppo_guardrails import (
    CHECKS,
    BestPolicy,
    Guardrails,
    ScoreRange,
    distinct_fraction,
    flag_key,
    read_score_range,
    share_above,
    startup_warnings,
    summarize,
)
from test_ppo import ScriptedBackend, env, make_cfg  # noqa: F401  (its module-scoped fixture is reused)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The tiny runs use one thread (``threads=1``: repeatable under load); the other tests keep the session's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the measurements


def naive_distinct_fraction(response: torch.Tensor, response_mask: torch.Tensor) -> float:
    seen = {tuple(row[mask].tolist()) for row, mask in zip(response, response_mask)}
    return len(seen) / len(response)


def test_distinct_fraction_matches_a_set_of_token_tuples():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch, width = 12, 5
        response = torch.randint(0, 3, (batch, width), generator=generator)  # 3 tokens: many repeats
        lengths = torch.randint(1, width + 1, (batch,), generator=generator)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        response = torch.where(mask, response, torch.full_like(response, 9))  # PAD after the end
        assert distinct_fraction(response, mask) == naive_distinct_fraction(response, mask)


def test_distinct_fraction_ignores_padding_and_counts_one_output_once():
    pad = 9
    same = torch.tensor([[4, 5, 2, pad], [4, 5, 2, pad], [4, 5, 2, pad]])
    mask = same != pad
    assert distinct_fraction(same, mask) == pytest.approx(1 / 3)
    # a response cut before its EOS differs from the finished one; what follows the mask never counts
    rows = torch.tensor([[4, 5, 2, 7], [4, 5, 2, 8], [4, 5, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    assert distinct_fraction(rows, mask) == pytest.approx(2 / 3)


def test_share_above_counts_finished_responses_only():
    scores = torch.tensor([0.5, 3.0, 4.0, 10.0, -1.0])
    has_eos = torch.tensor([True, True, True, False, True])
    naive = sum(s > 2.0 for s, e in zip(scores.tolist(), has_eos.tolist()) if e) / sum(has_eos.tolist())
    assert share_above(scores, has_eos, 2.0) == pytest.approx(naive) == pytest.approx(0.5)
    assert share_above(scores, torch.zeros(5, dtype=torch.bool), 2.0) is None


def test_read_score_range_reads_the_rm_results_and_tolerates_their_absence(tmp_path):
    assert read_score_range(tmp_path) is None
    (tmp_path / "results.json").write_text(json.dumps({"valid_accuracy": 0.7}))
    assert read_score_range(tmp_path) is None
    distribution = {"min": -2.5, "max": 3.25, "p95": 2.0, "source": "the responses of the valid comparisons"}
    (tmp_path / "results.json").write_text(json.dumps({"score_distribution": distribution}))
    got = read_score_range(tmp_path)
    assert (got.low, got.high) == (-2.5, 3.25) and "valid comparisons" in got.source


# --------------------------------------------------------------------------- the checks


class FakeRollout:
    def __init__(self, raw_scores, has_eos):
        self.raw_scores, self.has_eos = torch.tensor(raw_scores), torch.tensor(has_eos)


def metrics(kl=0.0, entropy=5.0, distinct=1.0, eos_rate=1.0) -> dict:
    return {"objective/kl": kl, "policy/entropy": entropy, "response/distinct_fraction": distinct,
            "response/eos_rate": eos_rate}  # fmt: skip


def settings(*overrides: str):
    from instructrl.config import load_config

    return load_config(ppo.Config, overrides=list(overrides)).guardrails


def test_each_check_fails_exactly_past_its_threshold(capsys):
    """Relative checks compare with iteration 1 (the SFT policy); each fails just past its threshold, not inside it."""
    guard = Guardrails(settings(), ScoreRange(-2.0, 3.0, "test"))
    fine = FakeRollout([0.0, 1.0, 2.9, 5.0], [True, True, True, False])  # the 5.0 has no EOS: not counted
    baseline = metrics(entropy=4.0, distinct=0.8, eos_rate=0.9)
    assert guard.check(1, baseline, fine) == {
        "guardrails/score_above_rm_max": 0.0,
        **{flag_key(name): 0.0 for name in CHECKS},
    }
    inside = metrics(kl=19.99, entropy=1.01, distinct=0.201, eos_rate=0.71)  # limits 20, 0.25·4, 0.25·0.8, 0.1 + 0.2
    flags = guard.check(2, inside, FakeRollout([3.5, 0.0, 0.0, 0.0, 0.0, 0.0], [True] * 6))  # share 1/6 < 0 + 0.25
    assert not any(flags[flag_key(name)] for name in CHECKS), flags
    assert guard.clean
    past = metrics(kl=20.5, entropy=0.99, distinct=0.19, eos_rate=0.69)
    flags = guard.check(3, past, FakeRollout([3.5, 3.1, 0.0, 0.0], [True] * 4))  # share 0.5
    assert all(flags[flag_key(name)] == 1.0 for name in CHECKS), flags
    assert not guard.clean
    printed = capsys.readouterr().out
    for name in CHECKS:
        assert f"WARNING guardrail '{name}' at iteration 3" in printed
    assert "KL(π ‖ π^SFT) is 20.5 nats per response, up 20.5 over the last 2 iterations" in printed
    assert "kl.coef" in printed and "another round of rankings" in printed


def test_a_check_warns_once_per_streak_and_says_when_it_passes_again(capsys):
    guard = Guardrails(settings("guardrails.max_kl=5"), None)
    for iteration, kl in enumerate([0.0, 6.0, 7.0, 4.0, 8.0], start=1):
        guard.check(iteration, metrics(kl=kl), None)
    printed = capsys.readouterr().out
    assert printed.count("WARNING guardrail 'kl'") == 2
    assert "WARNING guardrail 'kl' at iteration 2" in printed and "at iteration 5" in printed
    assert "guardrail 'kl' passes again at iteration 4" in printed
    assert guard.first_message["kl"].startswith("guardrail 'kl' at iteration 2")


def test_null_thresholds_and_a_missing_rm_range_turn_checks_off():
    guard = Guardrails(settings("guardrails.max_kl=null", "guardrails.min_entropy_ratio=null"), None)
    flags = guard.check(1, metrics(), FakeRollout([9.0], [True]))
    assert set(flags) == {flag_key("distinct"), flag_key("missing_eos")}


def test_stop_needs_patience_iterations_in_a_row():
    guard = Guardrails(settings("guardrails.max_kl=5", "guardrails.stop=true", "guardrails.patience=2"), None)
    reasons = [guard.check(i, metrics(kl=kl), None) and guard.stop_reason() for i, kl in enumerate([9, 1, 9, 9], 1)]
    assert reasons[:3] == [None, None, None] and "kl" in reasons[3]
    off = Guardrails(settings("guardrails.max_kl=5", "guardrails.patience=1"), None)
    off.check(1, metrics(kl=9), None)
    assert off.stop_reason() is None  # guardrails.stop is false by default


def test_guardrail_state_round_trips():
    guard = Guardrails(settings("guardrails.max_kl=5"), None)
    for i, kl in enumerate([0.0, 6.0, 7.0], 1):
        guard.check(i, metrics(kl=kl, entropy=3.0), None)
    restored = Guardrails(settings("guardrails.max_kl=5"), None)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict()
    assert restored.threshold("entropy") == guard.threshold("entropy") == 0.75


def test_summarize_reports_each_failed_check_from_metrics_records():
    records = [
        {"step": 1, "objective/kl": 1.0, flag_key("kl"): 0.0, "response/eos_rate": 1.0, flag_key("missing_eos"): 0.0},
        {"step": 2, "objective/kl": 30.0, flag_key("kl"): 1.0, "response/eos_rate": 0.5, flag_key("missing_eos"): 1.0},
        {"step": 3, "objective/kl": 40.0, flag_key("kl"): 1.0, "response/eos_rate": 1.0, flag_key("missing_eos"): 0.0},
        {"step": 4, "objective/kl": 35.0, flag_key("kl"): 1.0},
    ]
    rows = {row["check"]: row for row in summarize(records)}
    assert set(rows) == {"kl", "missing_eos"}
    assert rows["kl"]["iterations_failed"] == 3
    assert (rows["kl"]["first_iteration"], rows["kl"]["last_iteration"]) == (2, 4)
    assert rows["kl"]["value_first"] == 30.0 and rows["kl"]["value_worst"] == 40.0
    assert rows["missing_eos"]["value_first"] == 0.5 and "missing_eos_score" in rows["missing_eos"]["advice"]


def test_config_rejects_bad_thresholds():
    with pytest.raises(ConfigError, match="guardrails.min_distinct_ratio"):
        settings("guardrails.min_distinct_ratio=1.5")
    with pytest.raises(ConfigError, match="guardrails.max_kl"):
        settings("guardrails.max_kl=-1")
    with pytest.raises(ConfigError, match="guardrails.patience"):
        settings("guardrails.patience=0")


def test_startup_warns_about_the_paper_beta_on_small_policies_only():
    from instructrl.config import load_config

    def warnings(*overrides: str, parameters: int = 940_000) -> list[str]:
        cfg = load_config(ppo.Config, overrides=list(overrides))
        return startup_warnings(cfg, parameters, ScoreRange(0, 1, "x"), rm_scores=True)

    [message] = warnings()  # the defaults: fixed β = 0.02
    assert "kl.coef = 0.02" in message and "0.94M-parameter policy" in message
    assert "src/instructrl/demo.py" in message and "benchmarks/RESULTS.md" in message
    assert warnings(parameters=2_000_000_000) == []
    assert warnings("kl.coef=0.1") == []
    assert warnings("guardrails.small_policy_parameters=0") == []
    assert warnings("kl.adaptive=true") == []
    [target] = warnings("kl.adaptive=true", "kl.target=30")
    assert "kl.target = 30 exceeds guardrails.max_kl = 20" in target


# --------------------------------------------------------------------------- tiny PPO runs

AGGRESSIVE = (
    "ptx.coef=0", "batch_size=16", "minibatch_size=8", "micro_batch_size=8", "ppo_epochs=4", "lr=0.1",
    "value_lr=0.01", "warmup_iterations=0", "missing_eos_score=null", "ema_decay=null", "value_head_init=zero",
    "generation.max_new_tokens=6", "overlap_models=false", "save_policy_every=1", "threads=1",
)  # fmt: skip
"""Settings under which a tiny random policy learns within a few iterations."""


def pays_for_one_token_repeated(query, query_mask, response, response_mask):
    """The share of the response taken by its most frequent token: one token repeated (or a response that is
    only EOS) earns the most, an exploit the guardrails must see."""
    return torch.stack([torch.bincount(row[mask]).max() / mask.sum() for row, mask in zip(response, response_mask)])


def pays_nothing(query, query_mask, response, response_mask):
    return torch.zeros(query.shape[0])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_an_exploitable_reward_trips_the_guardrails_stops_the_run_and_keeps_the_best_policy(env, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "exploit"
    cfg = make_cfg(env, out, *AGGRESSIVE, "iterations=8", "guardrails.stop=true", "guardrails.patience=2")
    results = ppo.run(cfg, score_fn=pays_for_one_token_repeated)
    printed = capsys.readouterr().out

    rows = records(out)
    failed_at = [r["step"] for r in rows if any(r.get(flag_key(name)) for name in CHECKS)]
    trace = [(r["step"], r["policy/entropy"], r["response/distinct_fraction"], r["objective/kl"]) for r in rows]
    assert failed_at and failed_at[0] <= 6, trace
    guard = results["guardrails"]
    names = {entry["check"] for entry in guard["failed"]}
    assert names & {"entropy", "distinct"}, guard["failed"]
    assert "WARNING guardrail" in printed and f"at iteration {failed_at[0]}" in printed
    # guardrails.stop: two failing iterations in a row end the run, which still saves everything
    assert guard["stopped_early"]["iteration"] == results["iterations_done"] == rows[-1]["step"] < 8
    assert "stopping early" in printed
    assert (out / "policy" / "model.safetensors").exists() and (out / "value" / "model.safetensors").exists()
    # policy_best: the weights that sampled the last rollout that passed, i.e. after (that iteration − 1) updates
    best = guard["best_policy"]
    assert best["updates"] == failed_at[0] - 2
    snapshot = out / f"policy-iter-{best['updates']:04d}" if best["updates"] else Path(env["policy"])
    expected, got = weights(snapshot), weights(out / "policy_best")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got)


def test_a_reward_with_nothing_to_exploit_trips_no_guardrail(env, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "benign"
    cfg = make_cfg(env, out, *AGGRESSIVE, "iterations=6", "guardrails.stop=true", "guardrails.patience=1",
                   "guardrails.small_policy_parameters=0")  # fmt: skip
    results = ppo.run(cfg, score_fn=pays_nothing)
    assert "WARNING" not in capsys.readouterr().out
    guard = results["guardrails"]
    assert guard["failed"] == [] and guard["stopped_early"] is None and results["iterations_done"] == 6
    assert set(guard["checked"]) == {"kl", "entropy", "distinct", "missing_eos"}  # no RM range: a score_fn scores
    assert guard["best_policy"]["updates"] == 5
    assert all(r[flag_key(name)] == 0.0 for r in records(out) for name in guard["checked"])


def test_the_rm_range_check_reads_the_reward_models_results(env, tmp_path, tiny_tokenizer):  # noqa: F811
    """With the reward model scoring finished responses: a range below every score it gives puts every sample of
    the SFT policy out of range, which the run notes at iteration 1 (the RM never saw samples like the policy's);
    a range above every score puts none out. The rise over the SFT policy's share is what fails the check."""
    import shutil

    eos = tiny_tokenizer.eos_token_id
    responses = torch.tensor([[5, 6, 7, eos, 0, 0]] * 8)
    for high, share in ((-100.0, 1.0), (100.0, 0.0)):
        rm_dir = tmp_path / f"rm{high}"
        shutil.copytree(env["rm"], rm_dir)
        (rm_dir / "results.json").write_text(json.dumps({"score_distribution": {"min": -101.0, "max": high}}))
        out = tmp_path / f"ppo{high}"
        cfg = make_cfg(env, out, f"reward_model={rm_dir}", "ptx.coef=0", "iterations=2", "kl.coef=0.1")
        results = ppo.run(cfg, sampler=ScriptedBackend(responses))
        rows = records(out)
        assert [r["response/eos_rate"] for r in rows] == [1.0, 1.0]
        assert [r["guardrails/score_above_rm_max"] for r in rows] == [share, share]
        assert [r[flag_key("rm_range")] for r in rows] == [0.0, 0.0]  # no rise over the SFT policy's share
        guard = results["guardrails"]
        assert guard["rm_score_range"]["high"] == high and "rm_range" in guard["checked"]
        notes = [w for w in guard["startup_warnings"] if "not trained on samples like the policy's" in w]
        assert len(notes) == (1 if share else 0)


def test_best_policy_keeps_the_weights_that_sampled_the_last_passing_rollout_before_the_first_failure():
    class Run:
        def __init__(self):
            self.models = type("Models", (), {"policy": torch.nn.Linear(1, 1, bias=False)})()
            self.actor = type("Actor", (), {"ema": None})()
            self.iteration = 0

        def step(self, value: float) -> None:
            with torch.no_grad():
                self.models.policy.weight.fill_(value)
            self.iteration += 1

    run = Run()
    run.step(0.0)
    run.iteration = 0
    keeper = BestPolicy(run)  # the SFT weights (0.0) sample iteration 1's rollout
    for value, passed in ((1.0, True), (2.0, True), (3.0, False), (4.0, True), (5.0, False)):
        run.step(value)  # iteration k's update
        keeper.update(run, passed)
        best = keeper.best["weight"].item() if keeper.best is not None else None
        expected = {1.0: 0.0, 2.0: 1.0, 3.0: 1.0, 4.0: 1.0, 5.0: 1.0}[value]  # frozen at the first failure
        assert best == expected and keeper.iteration == int(expected)
    resumed = BestPolicy(run)  # a run resumed from a checkpoint written after the failure stays frozen
    resumed.load_state_dict(keeper.state_dict())
    run.step(6.0)
    resumed.update(run, True)
    assert resumed.best["weight"].item() == 1.0 and resumed.iteration == 1


def test_the_eval_report_shows_the_failed_guardrails_of_each_ppo_run():
    from instructrl.eval.report import ReportData, build_tables

    def record(step: int, kl: float, distinct: float, failed: float) -> dict:
        return {"step": step, "objective/kl": kl, flag_key("kl"): failed, "response/distinct_fraction": distinct,
                flag_key("distinct"): failed}  # fmt: skip

    hacked = [record(1, 0.5, 0.9, 0.0), record(2, 71.0, 0.1, 1.0)]
    healthy = [{"step": 1, "objective/kl": 0.5, flag_key("kl"): 0.0}]
    older = [{"step": 1, "objective/kl": 0.5}]
    data = ReportData(training_curves={"ppo": hacked, "ppo_ptx": healthy, "old": older})
    [table] = [t for t in build_tables(data) if t.id == "ppo-guardrails"]
    rows = {(row[0], row[1].split(":")[0]): row for row in table.rows}
    assert rows[("ppo", "kl")][2:5] == ["1", "2-2", "71.000 (worst 71.000)"] and "kl.coef" in rows[("ppo", "kl")][5]
    assert rows[("ppo", "distinct")][4] == "0.100 (worst 0.100)"
    assert rows[("ppo_ptx", "none failed (checked")][1] == "none failed (checked: kl)"
    assert rows[("old", "not checked (a run without guardrails)")][2] == "-"
    assert len(table.rows) == 4


def test_a_resumed_run_keeps_the_guardrails_baseline_warnings_and_best_policy(env, tmp_path):  # noqa: F811
    """Resumed from iteration 3's checkpoint, after the last passing rollout and before the checks fail: the same
    flags (the SFT policy's values come from the checkpoint, not from the first iteration after the resume), the
    same warnings and the same policy_best as an uninterrupted run."""
    import shutil

    settings = (*AGGRESSIVE, "iterations=5", "save_every=3", "resume=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = ppo.run(make_cfg(env, straight, *settings), score_fn=pays_for_one_token_repeated)
    assert first["guardrails"]["failed"] and first["guardrails"]["best_policy"]["updates"] == 2
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    second = ppo.run(make_cfg(env, resumed, *settings), score_fn=pays_for_one_token_repeated)

    untimed = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert untimed(records(straight))[3:] == untimed(records(resumed))
    strip = lambda g: json.loads(json.dumps(g).replace(str(straight), "").replace(str(resumed), ""))  # noqa: E731
    assert strip(first["guardrails"]) == strip(second["guardrails"])
    a, b = weights(straight / "policy_best"), weights(resumed / "policy_best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
