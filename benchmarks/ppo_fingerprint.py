"""A fingerprint of a short PPO-ptx run on a tiny model: every metric of every iteration and a hash of each
saved model's weights, as JSON.

For refactors that must not change behaviour: run it before and after, on the same machine, and compare the
two files (``--compare``). It runs the CLI (``instructrl ppo``) on a tiny GPT-2 policy built in-process, with
fixed seeds, float32 on a CPU, the default settings except ``overlap_models=false`` (with two threads the
overlapped steps may add in another order from run to run, so only the sequential path is bitwise
repeatable) and ``missing_eos_score=null`` (a random tiny policy rarely ends its responses, and the reward
model's scores should count). Exact equality is expected only on the same machine and library versions.

    python benchmarks/ppo_fingerprint.py --out before.json
    python benchmarks/ppo_fingerprint.py --out after.json --compare before.json

``--num-processes 2`` fingerprints the data-parallel path instead (``instructrl ppo --num-processes 2``: 2 CPU
processes over gloo, each with ``--threads`` threads), e.g. to check that a change keeps it bit for bit too.

Metrics that only the newer run logs are listed and left out of the comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

TEXTS = [f"Instruction: what is {a} plus {b} ?\nResponse: {a + b}" for a in range(10) for b in range(10)] + [
    "the capital of norland is vesk .",
    "once upon a time a small cat sat on a mat and sang .",
] * 20
PROMPTS = [f"Instruction: what is {a} plus {b} ?\nResponse:" for a in range(4) for b in range(4)]


def build_inputs(root: Path) -> dict[str, Path]:
    """A tiny BPE tokenizer, a GPT-2 policy, a reward model from a second LM, prompts and pretraining texts."""
    from instructrl.models.causal_lm import ModelSpec, build_causal_lm
    from instructrl.models.reward import reward_model_from_causal_lm
    from instructrl.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    paths = {name: root / name for name in ("policy", "lm_for_rm", "rm")}
    for seed, name in ((0, "policy"), (1, "lm_for_rm")):
        torch.manual_seed(seed)
        spec = ModelSpec(arch="gpt2", d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
        build_causal_lm(spec, tokenizer).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    torch.manual_seed(2)
    reward_model_from_causal_lm(paths["lm_for_rm"], tokenizer.pad_token_id).save_pretrained(paths["rm"])
    tokenizer.save_pretrained(paths["rm"])
    paths["prompts"] = root / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    paths["texts"] = root / "texts.jsonl"
    paths["texts"].write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return paths


def fingerprint(threads: int, processes: int = 1) -> dict:
    from instructrl.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_inputs(root)
        out = root / "ppo"
        settings = [
            f"policy={paths['policy']}", f"reward_model={paths['rm']}", f"prompts={paths['prompts']}",
            f"ptx.data={paths['texts']}", "ptx.coef=0.5", "ptx.batch_ratio=1", "ptx.seq_len=16",
            f"output_dir={out}", "iterations=3", "batch_size=8", "minibatch_size=4", "micro_batch_size=2",
            "generation.max_new_tokens=6", "missing_eos_score=null", "sample_every=1", "num_samples=8", "save_every=2",
            "overlap_models=false", f"threads={threads}", "device=cpu",
        ]  # fmt: skip
        launch = ["--num-processes", str(processes)] if processes > 1 else []
        if main(["ppo", *launch, *(a for s in settings for a in ("--set", s))]) != 0:
            raise SystemExit("the PPO run failed")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        weights = {
            name: hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest()
            for name in ("policy", "value")
        }
    untimed = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in metrics]
    return {"metrics": untimed, "samples": samples, "weights": weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the fingerprint JSON goes")
    parser.add_argument("--compare", type=Path, help="an earlier fingerprint that this one must equal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (CPU, gloo)")
    args = parser.parse_args()
    result = {"threads": args.threads, **fingerprint(args.threads, args.num_processes)}
    if args.num_processes > 1:
        result["processes"] = args.num_processes
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    earlier = json.loads(args.compare.read_text())
    differing, added = differences(earlier, result)
    note = f" (metrics added, not compared: {', '.join(added)})" if added else ""
    print(("identical" if not differing else f"DIFFERENT: {', '.join(differing)}") + note)
    return 1 if differing else 0


def differences(earlier: dict, current: dict) -> tuple[list[str], list[str]]:
    """The parts of ``current`` that differ from ``earlier``, and the metrics only ``current`` has. A metric that
    was added (e.g. one more statistic of the rollout) is listed, not counted: the behaviour is the same when
    every metric the earlier run logged, every sample and every weight are."""
    keys = lambda rows: {key for row in rows for key in row}  # noqa: E731
    added = sorted(keys(current["metrics"]) - keys(earlier.get("metrics", [])))
    kept = [{k: v for k, v in row.items() if k not in added} for row in current["metrics"]]
    differing = [key for key in ("samples", "weights") if earlier.get(key) != current[key]]
    return (["metrics"] if earlier.get("metrics") != kept else []) + differing, added


if __name__ == "__main__":
    sys.exit(main())
