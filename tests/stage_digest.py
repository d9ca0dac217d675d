"""Digest of tiny pretrain / SFT / RM runs: a refactor of the stage loops must leave it unchanged, bit for bit.

Run ``python tests/stage_digest.py OUT_DIR`` before and after a change (fp32, CPU, one thread) and compare the
printed JSON: per run (straight, then resumed from its newest checkpoint), the SHA-256 of ``metrics.jsonl``,
of every saved weight tensor and of ``results.json`` without its wall-clock ``seconds`` (and with OUT_DIR
written as ``<root>``). The settings are flat
``key=value`` overrides, which every config version accepts, so one script digests the code before and after
a config rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_TEXTS, _save_tiny_lm  # noqa: E402
from instructrl.config import load_config  # noqa: E402
from instructrl.models.tokenizer import train_bpe_tokenizer  # noqa: E402
from instructrl.stages import pretrain, rm, sft  # noqa: E402
from test_rm import toy_files  # noqa: E402

RUN = ("device=cpu", "threads=1", "seed=3")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def digest(out: Path, root: Path) -> dict:
    weights = {}
    for file in sorted(out.glob("*.safetensors")):
        for name, tensor in sorted(load_file(file).items()):
            weights[name] = _sha(tensor.contiguous().numpy().tobytes())
    results = json.loads((out / "results.json").read_text())
    results.pop("seconds", None)
    return {
        "metrics": _sha((out / "metrics.jsonl").read_bytes()),
        "weights": _sha(json.dumps(weights, sort_keys=True).encode()),
        "results": _sha(json.dumps(results, sort_keys=True, default=str).replace(str(root), "<root>").encode()),
    }


def _demos(path: Path, n: int = 40) -> Path:
    rows = [
        {"prompt": f"Instruction: what is {a} plus {b} ?\nResponse:", "response": f" {a + b}"}
        for a, b in ((i % 5, (i * 3) % 4) for i in range(n))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(root: Path) -> dict:
    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(TINY_TEXTS, vocab_size=300)
    lm = _save_tiny_lm(root / "tiny_lm", tokenizer)
    demos = _demos(root / "demos.jsonl")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in random.Random(0).sample(TINY_TEXTS, 60)))
    comparisons, rm_demos = toy_files(root, 60, seed=2)
    runs = {
        "pretrain": (
            pretrain,
            ["sandbox_docs=300", "heldout_docs=30", "vocab_size=300", "model.d_model=32", "model.n_layers=1"]
            + ["model.n_heads=2", "seq_len=32", "batch_size=4", "max_steps=6", "eval_every=3", "save_every=2"]
            + ["eval_windows=4", "warmup_steps=2"],
        ),
        "sft": (
            sft,
            [f"model={lm}", f"data={demos}", "epochs=2", "batch_size=8", "micro_batch_size=4", "save_every=2"]
            + [f"pretrain_data={texts}", "ptx_fraction=0.2", "warmup_steps=1"],
        ),
        "sft_lora_packing": (
            sft,
            [f"model={lm}", f"data={demos}", "epochs=1", "batch_size=4", "lora.enabled=true", "packing=true"]
            + ["lora.target_modules=[q_proj, v_proj]", "ptx_fraction=0", "save_every=3"],
        ),
        "rm": (
            rm,
            [f"model={lm}", f"comparisons={comparisons}", f"demonstrations={rm_demos}", "batch_size=8"]
            + ["micro_batch_size=4", "lr=3e-3", "eval_every=3", "save_every=2", "epochs=2", "heldout_labelers=[L2]"],
        ),
        "rm_no_demos": (
            rm,
            [f"model={lm}", f"comparisons={comparisons}", "batch_size=6", "micro_batch_size=0", "eval_every=4"]
            + ["save_every=3", "valid_fraction=0.2"],
        ),
    }
    report = {}
    for name, (module, overrides) in runs.items():
        out = root / name
        cfg = load_config(module.Config, None, [f"output_dir={out}", *RUN, *overrides])
        module.run(cfg)
        report[name] = digest(out, root)
        # Resume: drop the outputs and run again; it continues from the newest checkpoint to the same end.
        for file in [*out.glob("*.safetensors"), out / "results.json"]:
            file.unlink()
        module.run(cfg)
        report[name + " (resumed)"] = digest(out, root)
    return report


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # the stages' progress lines; stdout holds only the digest
        result = main(Path(sys.argv[1]))
    print(json.dumps(result, indent=1, sort_keys=True))
