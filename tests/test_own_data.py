"""No silent sandbox data: a run given the user's own files never reads the sandbox, refuses settings that would mix
the sandbox's data in, and logs where each of its data sources came from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import TINY_TEXTS
from instructrl.config import ConfigError, load_config
from instructrl.sandbox.world import SandboxWorld
from instructrl.stages import ppo, pretrain, rm, sft
from test_rm import toy_files


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "module, overrides, named, fix",
    [
        (sft, ["data=D"], "pretrain_data", "ptx_fraction=0"),  # the paper's 10% pretraining mix, on by default
        (sft, ["pretrain_data=T"], "data", None),
        (ppo, ["prompts=P"], "ptx.data", "ptx.coef=0"),  # PPO-ptx is the default
        (ppo, ["ptx.data=T"], "prompts", None),
        (rm, ["demonstrations=D"], "comparisons", None),
        (pretrain, ["corpus=T"], "heldout", None),
        (pretrain, ["heldout=T"], "corpus", None),
    ],
)
def test_a_setting_that_would_mix_in_sandbox_data_is_refused_by_name(tmp_path, module, overrides, named, fix):
    files = {key: write_jsonl(tmp_path / f"{key}.jsonl", [{"text": "x"}]) for key in "DPT"}
    sets = [f"{o.split('=')[0]}={files[o.split('=')[1]]}" for o in overrides]
    with pytest.raises(ConfigError) as info:
        load_config(module.Config, overrides=sets)
    message = str(info.value)
    assert message.startswith(f"{named}: unset") and "sandbox" in message and f"set {named}=FILE.jsonl" in message
    assert (fix is None) or fix in message
    if fix is not None:  # turning the source off is the other way out
        load_config(module.Config, overrides=[*sets, fix])


def test_the_sandbox_defaults_need_no_file():
    for module in (pretrain, sft, rm, ppo):
        load_config(module.Config)  # the demo's path: every source from the sandbox, as before


@pytest.fixture
def no_sandbox(monkeypatch):
    """Every sandbox data source builds a ``SandboxWorld``; make building one fail the test."""

    def touched(*args, **kwargs):
        raise AssertionError("a run given the user's files touched the sandbox")

    monkeypatch.setattr(SandboxWorld, "__init__", touched)


def test_a_pipeline_on_user_files_reads_no_sandbox_data_and_names_every_source(
    tmp_path, tiny_lm_dir, no_sandbox, capsys
):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in random.Random(0).sample(TINY_TEXTS, 60)])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in TINY_TEXTS[:20]])
    demos = write_jsonl(
        tmp_path / "demos.jsonl",
        [
            {"prompt": f"Instruction: what is {i % 5} plus 1 ?\nResponse:", "response": f" {i % 5 + 1}"}
            for i in range(24)
        ],
    )
    comparisons, _ = toy_files(tmp_path, 24)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Instruction: what is 2 plus 3 ?\nResponse:"}] * 4)
    run = ["device=cpu", "threads=1"]
    base = tmp_path / "base"
    pretrain.run(
        load_config(
            pretrain.Config,
            overrides=[f"output_dir={base}", f"corpus={texts}", f"heldout={heldout}", "vocab_size=300", *run]
            + ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "seq_len=32", "batch_size=4"]
            + ["max_steps=2", "eval_every=2", "eval_windows=2", "warmup_steps=0"],
        )
    )
    sft.run(
        load_config(
            sft.Config,
            overrides=[f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'sft'}", f"data={demos}", *run]
            + [f"pretrain_data={texts}", "ptx_fraction=0.2", "epochs=1", "batch_size=8"],
        )
    )
    rm.run(
        load_config(
            rm.Config,
            overrides=[
                f"model={tmp_path / 'sft'}",
                f"output_dir={tmp_path / 'rm'}",
                f"comparisons={comparisons}",
                *run,
            ]
            + ["batch_size=8", "eval_every=100"],
        )
    )
    ppo.run(
        load_config(
            ppo.Config,
            overrides=[f"policy={tmp_path / 'sft'}", f"reward_model={tmp_path / 'rm'}", f"prompts={prompts}", *run]
            + [f"output_dir={tmp_path / 'ppo'}", f"ptx.data={texts}", "ptx.coef=1.0", "ptx.seq_len=16"]
            + ["ptx.batch_ratio=1", "iterations=1", "batch_size=4", "minibatch_size=2", "generation.max_new_tokens=4"],
        )
    )
    sources = [line for line in capsys.readouterr().out.splitlines() if " <- " in line]
    assert sources == [
        f"pretrain: data corpus <- {texts}",
        f"pretrain: data held-out text <- {heldout}",
        f"sft: data demonstrations <- {demos}",
        "sft: data validation demonstrations <- 0.05 of the demonstrations, held out",
        f"sft: data pretraining text (ptx_fraction) <- {texts}",
        f"rm: data comparisons <- {comparisons}",
        "rm: data validation comparisons <- 0.1 of the prompts",
        "rm: data demonstrations (the bias) <- best-ranked response of each training comparison",
        f"ppo: data prompts <- {prompts}",
        f"ppo: data pretraining text (ptx) <- {texts}",
    ]
