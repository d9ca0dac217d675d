"""Run independent model work at the same time on CPU threads (PPO's ``overlap_models``).

A PPO step does two pieces of work that share nothing: the policy's (log-probs, policy loss, backward,
clipping, optimizer step) and the value model's (values, value loss, backward, clipping, optimizer step). On a
GPU they queue on the device anyway. On a CPU with T intra-op threads, each kernel is split over T threads,
and at small widths many kernels (GELU, layer norm, attention at short lengths, the optimizer) gain little
from the split: the threads mostly wait for each other. Running the two pieces at once, each on its own
Python thread with T/2 intra-op threads, keeps both cores busy with work that needs no synchronization.
PyTorch releases the GIL inside its kernels and supports concurrent backward passes over disjoint graphs.

The results equal the sequential ones up to float rounding: a matmul split over fewer threads may add its
partial sums in another order. They are deterministic for a given thread count.

Overlapping does not always pay. With two threads each task runs on one, so when one side is much heavier
than the other (a 32k-vocabulary LM head on the policy's side), the lighter side's thread idles, and for
matmul-bound work one thread on one core is no better than half of two. ``AutoRunner`` therefore times both
ways on the first calls of this process and keeps the faster (as ``torch.backends.cudnn.benchmark`` picks
kernels); the choice is not saved in checkpoints, so a resumed run chooses afresh.

When one task finishes first, its threads would idle until the other ends. So a worker that is done hands its
intra-op threads to the ones still running: they pick them up at their next *claim point*
(:func:`claim_idle_threads`), which :func:`add_claim_points` puts before every decoder layer's forward and
after its backward. This pays most where one side is heavier, e.g. the policy's side with a large-vocabulary
LM head (measurements: benchmarks/RESULTS.md). The price: how many threads a kernel ran on now
depends on which side finished first, and a reduction split over more threads adds in another order, so two
runs may differ in the last bits (``overlap_models=false`` is bitwise repeatable).

Thread-local state does not cross into a worker thread by itself, so ``run`` takes the caller's grad mode,
inference mode and autocast into every worker (:func:`_callers_modes`): a task runs as it would have run on the
calling thread.

Every runner has the same interface: ``run(*tasks)`` returns the tasks' results in order, ``concurrent`` says
whether it runs them at once now, ``close()`` stops its threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch


class SequentialRunner:
    """Runs the tasks one after the other on the calling thread (GPUs, one CPU thread, or several processes)."""

    concurrent = False

    def run(self, *tasks: Callable[[], Any]) -> list[Any]:
        return [task() for task in tasks]

    def close(self) -> None:
        pass


def _callers_modes() -> Callable[[], contextlib.ExitStack]:
    """A context factory that puts a worker thread in the calling thread's grad mode, inference mode and CPU
    autocast (all thread-local)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        if autocast:
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
        return stack

    return context


class _IdleThreads:
    """Intra-op threads that finished workers of one ``OverlapRunner.run`` have handed back."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


_worker = threading.local()
"""In an overlap worker: ``idle`` (the run's :class:`_IdleThreads`, or None when not lending) and ``threads``."""


def claim_idle_threads() -> None:
    """In an overlap worker, take the intra-op threads that finished workers have handed back (PPO calls this
    between decoder layers, :func:`add_claim_points`); anywhere else, nothing."""
    idle = getattr(_worker, "idle", None)
    if idle is None or not idle.count:  # the unlocked read is only a hint; the count is taken under the lock
        return
    with idle.lock:
        extra, idle.count = idle.count, 0
    if extra:
        _worker.threads += extra
        torch.set_num_threads(_worker.threads)


def _claim_in_backward(grad: torch.Tensor) -> None:
    claim_idle_threads()


def _claim_point(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    claim_idle_threads()
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:  # and once this layer's backward is done
        hidden.register_hook(_claim_in_backward)


def add_claim_points(model: torch.nn.Module) -> int:
    """Let work on ``model`` in an overlap worker pick up handed-back threads before each block of its first
    ``nn.ModuleList`` (a decoder's layers) runs forward and after it has run backward; returns how many blocks.
    Outside an overlap worker the hooks do nothing."""
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), None)
    for layer in layers if layers is not None else ():
        layer.register_forward_pre_hook(_claim_point, with_kwargs=True)
    return len(layers) if layers is not None else 0


class OverlapRunner:
    """Runs up to ``len(shares)`` tasks at once on worker threads; task i gets ``shares[i]`` intra-op threads.

    ``threads`` (the caller's ``torch.get_num_threads()``) is split as evenly as possible: 2 → (1, 1),
    3 → (2, 1). The calling thread's own setting is left as it was. With ``lend_idle_threads`` a task that is
    done hands its threads to those still running (:func:`claim_idle_threads`).
    """

    concurrent = True

    def __init__(self, threads: int, tasks: int = 2, lend_idle_threads: bool = True):
        if threads < tasks:
            raise ValueError(f"overlapping {tasks} tasks needs at least {tasks} intra-op threads, got {threads}")
        self.threads = threads
        self.shares = [threads // tasks + (1 if i < threads % tasks else 0) for i in range(tasks)]
        self.lend_idle_threads = lend_idle_threads
        self._pool = ThreadPoolExecutor(max_workers=tasks, thread_name_prefix="instructrl-overlap")

    def run(self, *tasks: Callable[[], Any]) -> list[Any]:
        """Run ``tasks`` at once and return their results in order, each in the caller's modes. If a task raises,
        the others finish first, then the first error is raised: no task is left running on shared state."""
        if len(tasks) > len(self.shares):
            raise ValueError(f"{len(tasks)} tasks for a runner of {len(self.shares)} threads")

        idle = _IdleThreads() if self.lend_idle_threads else None
        context = _callers_modes()

        def in_worker(task: Callable[[], Any], share: int):
            def call():
                # A thread's first parallel op (get_num_threads included) resets its setting to the count last
                # set by any thread; trigger that first, then set this worker's own (thread-local) count.
                torch.get_num_threads()
                torch.set_num_threads(share)
                _worker.idle, _worker.threads = idle, share
                try:
                    with context():
                        return task()
                finally:
                    if idle is not None:
                        with idle.lock:  # hand this worker's threads (its share and any it claimed) over
                            idle.count += _worker.threads
                    _worker.idle = None

            return call

        futures = [self._pool.submit(in_worker(task, share)) for task, share in zip(tasks, self.shares)]
        try:
            errors = [f.exception() for f in futures]  # waits for every task
        finally:
            # torch.set_num_threads also stores the count that new threads start from: restore the caller's
            torch.set_num_threads(self.threads)
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


Mode = Literal["overlap", "sequential"]


class AutoRunner:
    """Times its first calls both ways, alternating (sequential first), then keeps the faster way.

    Calls are compared within one kind of work, told apart by the tasks' functions (a PPO minibatch step is
    one kind, a rollout's scoring forwards another). The first kind timed ``trials`` times each way decides,
    by each way's fastest call, which discounts one-off costs such as the first call's allocations; every
    kind then runs that way. A fresh process chooses afresh, so two runs may choose differently on a machine
    whose speed varies, and then agree only up to float rounding (set ``overlap_models`` to true or false for
    bitwise repeatability).
    """

    def __init__(self, threads: int, trials: int = 3, report: Callable[[str], None] | None = None):
        self.overlap = OverlapRunner(threads)
        self.sequential = SequentialRunner()
        self.trials = trials
        self.report = report
        self.seconds: dict[tuple[str, ...], dict[Mode, list[float]]] = {}
        self.chosen: Mode | None = None

    @property
    def concurrent(self) -> bool:
        return self.chosen == "overlap"

    def run(self, *tasks: Callable[[], Any]) -> list[Any]:
        if self.chosen is not None:
            return (self.overlap if self.chosen == "overlap" else self.sequential).run(*tasks)
        seconds = self.seconds.setdefault(_kind(tasks), {"sequential": [], "overlap": []})
        mode: Mode = "sequential" if len(seconds["sequential"]) <= len(seconds["overlap"]) else "overlap"
        start = time.perf_counter()
        results = (self.overlap if mode == "overlap" else self.sequential).run(*tasks)
        seconds[mode].append(time.perf_counter() - start)
        if min(len(v) for v in seconds.values()) >= self.trials:
            self._choose(seconds)
        return results

    def _choose(self, seconds: dict[Mode, list[float]]) -> None:
        best = {m: min(v) for m, v in seconds.items()}
        self.chosen = "overlap" if best["overlap"] < best["sequential"] else "sequential"
        release_free_heap_memory()
        if self.report is not None:
            self.report(
                f"overlap_models=auto: policy and value work at once {best['overlap'] * 1e3:.0f} ms, one after "
                f"the other {best['sequential'] * 1e3:.0f} ms (fastest of {self.trials}): {self.chosen}"
            )

    def close(self) -> None:
        self.overlap.close()


def _kind(tasks: tuple[Callable[[], Any], ...]) -> tuple[str, ...]:
    """What a call runs, for comparing like with like: the qualified names of its tasks' functions."""
    return tuple(getattr(getattr(task, "func", task), "__qualname__", repr(task)) for task in tasks)


def release_free_heap_memory() -> None:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim``; nothing on other C libraries).

    glibc gives each thread that allocates its own arena and keeps what is freed there for reuse, so the
    trial steps on the worker threads leave a few hundred MiB resident at the benchmark's larger shape even
    when the choice is to run sequentially from then on. Trimming once, after the choice, returns it.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


Runner = SequentialRunner | OverlapRunner | AutoRunner


def make_runner(
    setting: bool | str, device: torch.device, world_size: int, report: Callable[[str], None] | None = None
) -> Runner:
    """``setting`` true: overlap, false: sequential, 'auto': measure and choose (``AutoRunner``). Overlap only
    where it can help (a CPU, one process, two or more intra-op threads); sequential everywhere else."""
    threads = torch.get_num_threads()
    if setting is False or device.type != "cpu" or world_size != 1 or threads < 2:
        return SequentialRunner()
    if setting == "auto":
        return AutoRunner(threads, report=report)
    return OverlapRunner(threads)
