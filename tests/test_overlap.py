"""``instructrl.fast.overlap``: two tasks at once on CPU threads, and PPO with ``overlap_models`` against the
same run done sequentially."""

from __future__ import annotations

import contextlib
import threading
import time
from functools import partial

import pytest
import torch

from instructrl.fast import overlap
from instructrl.fast.overlap import (
    AutoRunner,
    OverlapRunner,
    SequentialRunner,
    add_claim_points,
    claim_idle_threads,
    make_runner,
)
from instructrl.stages.ppo import train_iteration
from instructrl.stages.ppo_build import PPORun, build_run
from instructrl.stages.ppo_rollout import Rollout
from instructrl.stages.ppo_trainers import reduce_side_stats
from test_ppo import env, make_cfg, scored_rollout  # noqa: F401  (its module-scoped fixture is reused)


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def minibatch_step(run: PPORun, minibatch: Rollout) -> dict[str, float | None]:
    """One PPO minibatch step as ``train_iteration`` takes it: the policy's and the value model's optimizer steps
    through the run's ``side_by_side``, then their statistics reduced."""
    sides = run.models.side_by_side(
        partial(run.actor.train_step, minibatch), partial(run.critic.train_step, minibatch)
    )
    return reduce_side_stats(sides, run.runtime)


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


def modes() -> tuple[bool, bool, bool, torch.dtype | None]:
    """This thread's grad mode, inference mode and CPU autocast (dtype when on)."""
    autocast = torch.is_autocast_enabled("cpu")
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
            torch.get_autocast_dtype("cpu") if autocast else None)  # fmt: skip


@contextlib.contextmanager
def inference_mode_and_bf16_autocast():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


CALLERS_MODES = {
    "default": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "bf16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "inference_mode_and_bf16_autocast": inference_mode_and_bf16_autocast,
}


@pytest.mark.parametrize("callers", list(CALLERS_MODES))
def test_workers_run_in_the_callers_grad_mode_inference_mode_and_autocast(callers):
    """Those modes are thread-local: a plain thread does not inherit them, the runner's workers re-enter them, and
    what a task computes there is what it computes on the calling thread (no graph under no_grad, inference
    tensors under inference mode, bf16 products under autocast)."""
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4)

    def compute():
        out = x @ weight
        return modes(), out.requires_grad, out.is_inference(), out.dtype

    runner = OverlapRunner(2)
    try:
        with CALLERS_MODES[callers]():
            expected = compute()
            on_a_plain_thread = []
            plain = threading.Thread(target=lambda: on_a_plain_thread.append(modes()))
            plain.start()
            plain.join()
            in_workers = runner.run(compute, compute)
            in_sequence = SequentialRunner().run(compute, compute)
        assert in_workers == [expected, expected]
        assert in_sequence == [expected, expected]
        if callers != "default":  # the workers' modes came from the caller, not from the thread's defaults
            assert on_a_plain_thread == [(True, False, False, None)] != [expected[0]]
        after = runner.run(modes, modes)  # and they do not stay behind in the worker threads
        assert after == [modes(), modes()] == [(True, False, False, None)] * 2
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


def test_the_sequential_runner_calls_in_order_on_the_calling_thread():
    calls = []
    with torch.inference_mode():
        results = SequentialRunner().run(
            lambda: calls.append(1) or torch.is_inference_mode_enabled(),
            lambda: calls.append(2) or threading.current_thread() is threading.main_thread(),
        )
    assert results == [True, True] and calls == [1, 2]


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


class FakeClock:
    """Stands in for ``time.perf_counter`` in the runner: tasks advance it by what they "cost"."""

    def __init__(self):
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def way() -> str:
    """How the runner is running the calling task: on one of its worker threads, or on the caller's."""
    return "overlap" if threading.current_thread().name.startswith("instructrl-overlap") else "sequential"


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(overlap.time, "perf_counter", fake)
    return fake


@pytest.mark.parametrize("faster", ["overlap", "sequential"])
def test_auto_alternates_then_keeps_the_faster_way(faster, clock):
    """Calls cost more one way: after 2 timed calls each way, alternating from sequential, the other is kept."""
    messages = []
    runner = AutoRunner(2, trials=2, report=messages.append)
    used = []

    def task():
        clock.advance(0.001 if way() == faster else 0.05)
        return way()

    try:
        assert runner.chosen is None and not runner.concurrent  # before the choice
        for _ in range(6):
            ways = runner.run(task, task)
            assert ways[0] == ways[1]
            used.append(ways[0])
        assert used[:4] == ["sequential", "overlap", "sequential", "overlap"]  # alternating, timed
        assert used[4:] == [faster, faster] and runner.chosen == faster
        assert runner.concurrent == (faster == "overlap")
        assert {mode: len(times) for mode, times in runner.seconds[(task.__qualname__,) * 2].items()} == {
            "sequential": 2, "overlap": 2
        }  # fmt: skip
        assert len(messages) == 1 and messages[0].endswith(faster)
        assert not hasattr(runner, "state_dict")  # the choice is not checkpointed: a resumed run chooses afresh
    finally:
        runner.close()


def test_auto_decides_by_each_ways_fastest_call(clock):
    """A one-off cost (say the first overlapped call's allocations) does not count against a way: each way's
    fastest call decides (overlap 10 s then 1 s, sequential 3 s twice: overlap)."""
    costs = {"sequential": [3.0, 3.0], "overlap": [10.0, 1.0]}
    runner = AutoRunner(2, trials=2)
    try:
        for _ in range(4):
            runner.run(lambda: clock.advance(costs[way()].pop(0)), lambda: None)
        assert costs == {"sequential": [], "overlap": []} and runner.chosen == "overlap"
    finally:
        runner.close()


def test_auto_times_each_kind_of_work_apart_and_the_first_kind_timed_enough_decides(clock):
    """Calls are compared like with like, by their tasks' functions (a partial's function: its arguments do not
    make another kind). Each kind alternates from sequential on its own, and the first kind with ``trials``
    timings each way decides for every kind, here for the kind that would have chosen otherwise."""

    def step(side):  # faster overlapped
        clock.advance(1.0 if way() == "overlap" else 2.0)
        return way()

    def score(side):  # faster one after the other
        clock.advance(5.0 if way() == "overlap" else 0.1)
        return way()

    runner = AutoRunner(2, trials=2)
    used = {"step": [], "score": []}
    try:
        for kind in ("step", "step", "score", "step", "score", "step", "score", "score"):
            function = step if kind == "step" else score
            ways = runner.run(partial(function, "policy"), partial(function, "value"))
            assert ways[0] == ways[1]
            used[kind].append(ways[0])
            if kind == "step" and len(used["step"]) < 4:
                assert runner.chosen is None
    finally:
        runner.close()
    assert used["step"] == ["sequential", "overlap", "sequential", "overlap"]
    assert used["score"][:2] == ["sequential", "overlap"]  # its own alternation, from sequential
    assert runner.chosen == "overlap" and used["score"][2:] == ["overlap", "overlap"]
    assert set(runner.seconds) == {(step.__qualname__,) * 2, (score.__qualname__,) * 2}
    assert [len(times) for times in runner.seconds[(score.__qualname__,) * 2].values()] == [1, 1]  # not timed after


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def one_ppo_ptx_step(cfg):
    torch.manual_seed(0)
    run = build_run(cfg)
    try:
        rollout = scored_rollout(run)
        before = (params(run.models.policy), params(run.models.value_model))
        stats = minibatch_step(run, rollout.select(slice(0, cfg.minibatch_size)))
        shadow = {k: v.clone() for k, v in run.actor.ema.shadow.items()}
        after = (params(run.models.policy), params(run.models.value_model), shadow)
    finally:
        run.close()
    return run, rollout, stats, before, after


def test_ppo_ptx_with_overlapped_models_equals_the_sequential_run(env, tmp_path):  # noqa: F811
    """Rollout tensors, statistics and both models after one PPO-ptx step (with EMA) agree; the overlapped
    run really used two threads (its sampler too), and its trainable weights changed."""
    results = {}
    with torch_threads(2):
        for overlapped in (True, False):
            cfg = make_cfg(env, tmp_path / str(overlapped), "ptx.coef=1.0", "ema_decay=0.9", "threads=2",
                           f"overlap_models={str(overlapped).lower()}")  # fmt: skip
            results[overlapped] = one_ppo_ptx_step(cfg)
    (run_a, r_a, stats_a, before_a, after_a), (run_b, r_b, stats_b, _, after_b) = results[True], results[False]
    runner_a, runner_b = run_a.models.side_by_side.__self__, run_b.models.side_by_side.__self__
    assert isinstance(runner_a, OverlapRunner) and isinstance(runner_b, SequentialRunner)
    assert run_a.sampler.runner is runner_a and run_b.sampler.runner is runner_b
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
        for attempt in range(2):
            cfg = make_cfg(env, tmp_path / str(attempt), "ptx.coef=1.0", "threads=2", "iterations=1",
                           "overlap_models=true")  # fmt: skip
            torch.manual_seed(0)
            run = build_run(cfg)
            runner = run.models.side_by_side.__self__
            assert isinstance(runner, OverlapRunner) and run.sampler.runner is runner
            runner.lend_idle_threads = False  # repeatable to the bit without handing threads over (see above)
            try:
                metrics, _, _ = train_iteration(run)
            finally:
                run.close()
            weights.append((params(run.models.policy), params(run.models.value_model), metrics))
    (policy_a, value_a, metrics_a), (policy_b, value_b, metrics_b) = weights
    assert all(torch.equal(policy_a[k], policy_b[k]) for k in policy_a)
    assert all(torch.equal(value_a[k], value_b[k]) for k in value_a)
    assert {k: v for k, v in metrics_a.items() if not k.startswith("time/")} == {
        k: v for k, v in metrics_b.items() if not k.startswith("time/")
    }
