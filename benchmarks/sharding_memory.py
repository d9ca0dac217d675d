"""What sharding costs and saves: bytes of parameters + optimizer state per PPO process, and s/iteration, for
``run.sharding=none`` and ``fsdp`` with N = 1 and 2 CPU processes (gloo), on the tiny shapes of
``ppo_fingerprint.py`` (GPT-2 policy, d=32, 2 layers; PPO-ptx).

    python benchmarks/sharding_memory.py                     # 3 timed iterations after 1 warm-up
    python benchmarks/sharding_memory.py --iterations 5 --d-model 128 --layers 4

Each configuration runs in its own processes (``--worker``), started as a launcher starts them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), one torch thread each. Reported per configuration, for rank
0 (every rank holds the same amount): the bytes this process holds (:func:`instructrl.utils.sharding.local_bytes`:
a shard counts its local part) in the four models' weights, the gradients, the AdamW states, the EMA and the
sampler's gathered copy of the policy; their total next to :func:`~instructrl.utils.sharding.ppo_bytes_per_process`
(which assumes four models of the policy's size: the reward and value models here add a scalar head and drop
the LM head, so the two differ by those); and the median s/iteration. With N = 1, ``fsdp`` runs unsharded (one
process holds everything whatever the setting). Timings on a shared CPU drift; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_fingerprint import build_inputs  # noqa: E402


def worker(ns: argparse.Namespace) -> None:
    from instructrl.config import load_config
    from instructrl.stages import ppo
    from instructrl.stages.ppo_build import build_run
    from instructrl.utils.sharding import local_bytes, ppo_bytes_per_process

    torch.set_num_threads(1)
    paths = json.loads(ns.paths)
    settings = [
        f"policy={paths['policy']}", f"reward_model={paths['rm']}", f"prompts={paths['prompts']}",
        f"ptx.data={paths['texts']}", "ptx.coef=0.5", "ptx.batch_ratio=1", "ptx.seq_len=16", "batch_size=8",
        "minibatch_size=4", "micro_batch_size=2", "generation.max_new_tokens=6", "missing_eos_score=null",
        "overlap_models=false", "device=cpu", f"run.sharding={ns.sharding}", f"output_dir={ns.out}",
    ]  # fmt: skip
    run = build_run(load_config(ppo.Config, overrides=settings))
    times = []
    for iteration in range(1 + ns.iterations):
        started = time.perf_counter()
        ppo.train_iteration(run)
        if iteration > 0:  # the first one warms up
            times.append(time.perf_counter() - started)
    models = run.models
    held = {
        "weights": sum(local_bytes(m) for m in (models.policy, models.value_model, models.ref_policy)),
        "gradients": sum(
            local_bytes([p.grad for p in m.parameters() if p.grad is not None])
            for m in (run.actor.model, run.critic.model)
        ),  # fmt: skip
        "adam_states": local_bytes(list(run.actor.optimizer.state.values()))
        + local_bytes(list(run.critic.optimizer.state.values())),
        "ema": local_bytes(run.actor.ema.shadow) if run.actor.ema is not None else 0,
        "sampler_copy": local_bytes(run.sampler.copy) if hasattr(run.sampler, "copy") else 0,
    }
    # the reward model is held by the default scorer (a closure over it), not by PPOModels
    scorer_models = [c.cell_contents for c in models.score.__closure__ or ()]
    held["weights"] += sum(local_bytes(m) for m in scorer_models if isinstance(m, torch.nn.Module))
    parameters = sum(p.numel() for p in run.models.policy.parameters())  # a shard's numel is the full one
    if run.runtime.rank == 0:
        Path(ns.result).write_text(json.dumps({
            "held": held, "total": sum(held.values()), "s_per_iteration": statistics.median(times),
            "formula": ppo_bytes_per_process(parameters, run.runtime.world_size, ns.sharding),
        }))  # fmt: skip
    run.close()


def launch(processes: int, sharding: str, paths: dict, iterations: int, root: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    result = root / f"{sharding}-{processes}.json"
    command = [sys.executable, __file__, "--worker", "--sharding", sharding, "--iterations", str(iterations),
               "--paths", json.dumps({k: str(v) for k, v in paths.items()}), "--result", str(result),
               "--out", str(root / f"run-{sharding}-{processes}")]  # fmt: skip
    ranks = []
    for rank in range(processes):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if processes > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                       LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    if any(r.wait(timeout=900) for r in ranks):
        raise SystemExit(f"the {sharding} run with {processes} process(es) failed")
    return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations (after one warm-up)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        worker(ns)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_inputs(root)
        header = f"{'sharding':8} {'N':>2} {'held bytes':>11} {'formula':>9}  {'s/iter':>7}"
        print(header + "  (weights, gradients, Adam, EMA, sampler copy)")
        for sharding in ("none", "fsdp"):
            for processes in (1, 2):
                r = launch(processes, sharding, paths, ns.iterations, root)
                parts = ", ".join(str(v) for v in r["held"].values())
                print(f"{sharding:8} {processes:>2} {r['total']:>11} {round(r['formula']):>9}  "
                      f"{r['s_per_iteration']:>7.3f}  ({parts})", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
