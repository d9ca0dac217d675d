"""``instructrl.utils.overlap``: two tasks at once on CPU threads, and PPO with ``overlap_models`` against the
same run done sequentially."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from instructrl.stages.ppo_parts import compute_advantages
from instructrl.stages.ppo_session import build_session, collect_rollout, minibatch_step, train_iteration
from instructrl.utils.overlap import (
    AutoRunner,
    OverlapRunner,
    SequentialRunner,
    add_claim_points,
    claim_idle_threads,
    make_runner,
)
from test_ppo import env, make_cfg  # noqa: F401  (its module-scoped fixture is reused)


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_tasks_run_at_the_same_time_each_on_its_share_of_threads():
    meeting = threading.Barrier(2, timeout=10)  # broken (an error) unless both tasks are running at once

    def task(value):
        def run():
            meeting.wait()
            return value, torch.get_num_threads(), threading.current_thread() is threading.main_thread()

        return run

    with torch_threads(3):
        runner = OverlapRunner(torch.get_num_threads())
        try:
            results = runner.run(task("a"), task("b"))
            assert torch.get_num_threads() == 3  # the caller's setting is back
        finally:
            runner.close()
    assert results == [("a", 2, False), ("b", 1, False)]  # in order; 3 threads split 2 + 1


def other_side_done_then(work):
    """Two tasks for a 2-thread runner: ``work(finish_other)``, where ``finish_other()`` lets the other task
    return and waits until its worker has handed its thread over, and that other task."""
    release, done = threading.Event(), threading.Event()

    def other():
        assert release.wait(timeout=10)
        threading.Timer(0.05, done.set).start()  # its worker hands over as this returns

    def finish_other():
        release.set()
        assert done.wait(timeout=10)

    return lambda: work(finish_other), other


@pytest.mark.parametrize("lend", [True, False])
def test_a_finished_task_hands_its_threads_to_the_one_still_running(lend):
    def long(finish_other):
        before = torch.get_num_threads()
        finish_other()
        claim_idle_threads()
        return before, torch.get_num_threads()

    with torch_threads(2):
        runner = OverlapRunner(2, lend_idle_threads=lend)
        try:
            claimed, _ = runner.run(*other_side_done_then(long))
            assert torch.get_num_threads() == 2  # the caller's setting is back
            again = runner.run(torch.get_num_threads, torch.get_num_threads)  # each run starts from the shares
        finally:
            runner.close()
        claim_idle_threads()  # outside a worker: nothing happens
        assert torch.get_num_threads() == 2
    assert claimed == (1, 2 if lend else 1)
    assert again == [1, 1]


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_claim_points_pick_up_handed_over_threads_between_layers(tiny_tokenizer, phase):
    """Before a layer's forward, and after a layer's backward, work on a model with claim points takes the
    thread that the finished side handed over."""
    from instructrl.models.causal_lm import ModelSpec, build_causal_lm

    model = build_causal_lm(ModelSpec(arch="llama", d_model=32, n_layers=2, n_heads=2, max_seq_len=32), tiny_tokenizer)
    assert add_claim_points(model) == 2
    threads_in_last_layer = []
    model.model.layers[1].register_forward_hook(lambda *_: threads_in_last_layer.append(torch.get_num_threads()))
    ids = torch.tensor([[5, 6, 7, 8]])

    def work(finish_other):
        if phase == "forward":
            finish_other()
        loss = model(input_ids=ids).logits.sum()
        during_forward = torch.get_num_threads()
        if phase == "backward":
            finish_other()
        loss.backward()
        return during_forward, torch.get_num_threads()

    with torch_threads(2):
        runner = OverlapRunner(2)
        try:
            (during_forward, after_backward), _ = runner.run(*other_side_done_then(work))
        finally:
            runner.close()
    if phase == "forward":
        assert threads_in_last_layer == [2] and during_forward == 2
    else:  # only the backward's hooks ran after the other side was done
        assert threads_in_last_layer == [1] and during_forward == 1 and after_backward == 2


def test_the_context_is_entered_in_every_worker_thread():
    runner = OverlapRunner(2)
    try:
        modes = runner.run(torch.is_inference_mode_enabled, torch.is_inference_mode_enabled)
        assert modes == [False, False]  # thread-local: the caller's mode does not cross over by itself
        modes = runner.run(
            torch.is_inference_mode_enabled, torch.is_inference_mode_enabled, context=torch.inference_mode
        )
        assert modes == [True, True]
    finally:
        runner.close()


def test_an_error_is_raised_after_the_other_task_has_finished():
    finished = []

    def fails():
        raise ValueError("boom")

    def slow():
        time.sleep(0.2)
        finished.append(True)

    runner = OverlapRunner(2)
    try:
        with pytest.raises(ValueError, match="boom"):
            runner.run(fails, slow)
        assert finished == [True]
        with pytest.raises(ValueError, match="3 tasks"):
            runner.run(slow, slow, slow)
    finally:
        runner.close()
    with pytest.raises(ValueError, match="at least 2"):
        OverlapRunner(1)


def test_the_sequential_runner_calls_in_order_under_the_context():
    calls = []
    results = SequentialRunner().run(
        lambda: calls.append(1) or torch.is_inference_mode_enabled(),
        lambda: calls.append(2) or "second",
        context=torch.inference_mode,
    )
    assert results == [True, "second"] and calls == [1, 2]


def test_overlap_only_where_it_can_help():
    with torch_threads(2):
        assert isinstance(make_runner(True, torch.device("cpu"), 1), OverlapRunner)
        assert isinstance(make_runner("auto", torch.device("cpu"), 1), AutoRunner)
        assert isinstance(make_runner(False, torch.device("cpu"), 1), SequentialRunner)
        for setting in (True, "auto"):
            assert isinstance(make_runner(setting, torch.device("cpu"), 2), SequentialRunner)  # N processes
            assert isinstance(make_runner(setting, torch.device("cuda"), 1), SequentialRunner)
    with torch_threads(1):
        assert isinstance(make_runner("auto", torch.device("cpu"), 1), SequentialRunner)


@pytest.mark.parametrize("faster", ["overlap", "sequential"])
def test_auto_alternates_then_keeps_the_faster_way(faster):
    """Blocks are slow in one way (a sleep stands in for the work): after 2 trials each, the other is kept."""
    messages = []
    runner = AutoRunner(2, trials=2, report=messages.append)
    used = []
    try:
        assert runner.choice() is runner.sequential  # before the choice
        for _ in range(6):
            with runner.trial() as chosen:
                used.append("overlap" if chosen.concurrent else "sequential")
                time.sleep(0.001 if used[-1] == faster else 0.05)
        assert used[:4] == ["sequential", "overlap", "sequential", "overlap"]  # alternating, timed
        assert used[4:] == [faster, faster] and runner.chosen == faster
        assert runner.choice() is (runner.overlap if faster == "overlap" else runner.sequential)
        assert len(messages) == 1 and messages[0].endswith(faster)

        resumed = AutoRunner(2)
        resumed.load_state_dict(runner.state_dict())
        assert resumed.chosen == faster and resumed.seconds == runner.seconds
        resumed.load_state_dict(None)  # a checkpoint written before the runner existed: nothing to restore
        assert resumed.chosen == faster
        resumed.close()
    finally:
        runner.close()


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def one_ppo_ptx_step(cfg):
    torch.manual_seed(0)
    session = build_session(cfg)
    rollout, _ = collect_rollout(session)
    rollout = compute_advantages(rollout, session.kl_controller.value)
    before = (params(session.policy), params(session.value_model))
    stats = minibatch_step(session, rollout.select(slice(0, cfg.minibatch_size)))
    shadow = {k: v.clone() for k, v in session.ema.shadow.items()}
    after = (params(session.policy), params(session.value_model), shadow)
    session.runner.close()
    return session, rollout, stats, before, after


def test_ppo_ptx_with_overlapped_models_equals_the_sequential_run(env, tmp_path):  # noqa: F811
    """Rollout tensors, statistics and both models after one PPO-ptx step (with EMA) agree; the overlapped
    run really used two threads, and its trainable weights changed."""
    results = {}
    with torch_threads(2):
        for overlap in (True, False):
            cfg = make_cfg(env, tmp_path / str(overlap), "ptx.coef=1.0", "ema_decay=0.9", "threads=2",
                           f"overlap_models={str(overlap).lower()}")  # fmt: skip
            results[overlap] = one_ppo_ptx_step(cfg)
    (s_a, r_a, stats_a, before_a, after_a), (s_b, r_b, stats_b, _, after_b) = results[True], results[False]
    assert isinstance(s_a.runner, OverlapRunner) and isinstance(s_b.runner, SequentialRunner)
    torch.testing.assert_close(r_a.response, r_b.response, rtol=0, atol=0)
    for field in ("logprobs", "ref_logprobs", "entropy", "values", "scores", "advantages"):
        torch.testing.assert_close(getattr(r_a, field), getattr(r_b, field), rtol=1e-5, atol=1e-5, msg=field)
    assert stats_a.keys() == stats_b.keys()
    for key, value in stats_a.items():
        assert value == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    assert stats_a["loss/ptx"] is not None
    for model_a, model_b, start in zip(after_a[:2], after_b[:2], before_a):
        assert any(not torch.equal(model_a[k], start[k]) for k in start)  # the step moved the weights
        for name in model_a:
            torch.testing.assert_close(model_a[name], model_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, shadow in after_a[2].items():  # the EMA of the policy, updated on the policy's thread
        torch.testing.assert_close(shadow, after_b[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_overlapped_runs_are_deterministic(env, tmp_path):  # noqa: F811
    weights = []
    with torch_threads(2):
        for run in range(2):
            cfg = make_cfg(env, tmp_path / str(run), "ptx.coef=1.0", "threads=2", "iterations=1",
                           "overlap_models=true")  # fmt: skip
            torch.manual_seed(0)
            session = build_session(cfg)
            assert isinstance(session.runner, OverlapRunner)
            session.runner.close()  # repeatable to the bit without handing threads over (see the next tests)
            session.runner = OverlapRunner(2, lend_idle_threads=False)
            metrics, _, _ = train_iteration(session)
            session.runner.close()
            weights.append((params(session.policy), params(session.value_model), metrics))
    (policy_a, value_a, metrics_a), (policy_b, value_b, metrics_b) = weights
    assert all(torch.equal(policy_a[k], policy_b[k]) for k in policy_a)
    assert all(torch.equal(value_a[k], value_b[k]) for k in value_a)
    assert {k: v for k, v in metrics_a.items() if not k.startswith("time/")} == {
        k: v for k, v in metrics_b.items() if not k.startswith("time/")
    }
