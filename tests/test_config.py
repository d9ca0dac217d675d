"""Config system: YAML + --set overrides, strict keys with suggestions, type checks, validation, help text."""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field

import pytest
import yaml

from instructrl.cli import COMMANDS, main
from instructrl.config import (
    ConfigError,
    RunSettings,
    check_resume_compatible,
    describe,
    field_docs,
    load_config,
    require_positive,
    resume_fingerprint,
    to_dict,
)
from instructrl.errors import UserFacingError


@dataclass
class Inner:
    target: float = 6.0
    """Target KL in nats."""
    horizon: int = 10000
    """Episodes over which the controller acts."""


@dataclass
class Outer:
    lr: float = 1e-3
    """Peak learning rate."""
    name: str | None = None
    """Optional name."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    mode: str = "a"
    """Mode."""
    kl: Inner = field(default_factory=Inner)
    """KL controller."""
    resume: bool = True
    """Resume."""

    def validate(self) -> None:
        require_positive(self, "lr")


def test_field_docs_are_read_from_attribute_docstrings():
    assert field_docs(Outer)["lr"] == "Peak learning rate."
    text = describe(Outer)
    assert "kl.target (float, default 6.0)" in text and "Target KL in nats." in text


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "kl": {"horizon": 5}}))
    cfg = load_config(Outer, path, ["kl.target=3", "betas=[0.8, 0.9]", "name=run1"])
    assert cfg.lr == 0.5 and cfg.kl.horizon == 5 and cfg.kl.target == 3.0
    assert cfg.betas == (0.8, 0.9) and cfg.name == "run1"
    assert to_dict(cfg)["betas"] == [0.8, 0.9]
    assert load_config(Outer, None, ["lr=1e-3"]).lr == 1e-3  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "did you mean 'lr'"),
        ("kl.targt=1", "did you mean 'kl.target'"),
        ("lr=abc", "lr: expected a number"),
        ("kl.horizon=1.5", "kl.horizon: expected an integer"),
        ("betas=[1]", "betas: expected 2 values"),
        ("lr=-1", "lr: must be > 0"),
        ("resume=maybe", "resume: expected true/false"),
        ("noequals", "expects key=value"),
    ],
)
def test_bad_values_fail_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)


def test_resume_refuses_changed_results_but_not_neutral_keys():
    saved = resume_fingerprint(Outer())
    check_resume_compatible(saved, Outer(resume=False), "run")
    with pytest.raises(UserFacingError, match="changed: lr"):
        check_resume_compatible(saved, Outer(lr=0.5), "run")


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("lr (float, default 0.001)", "lora.r (int, default 8)", "ptx_fraction", "residual_dropout"):
        assert name in out


def test_cli_top_level_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="did you mean 'sft'"):
        main(["sfft"])
    assert set(COMMANDS) >= {"pretrain", "sft", "rm", "ppo", "eval", "generate", "data prepare", "demo"}


@pytest.mark.parametrize("argv", [["label", "--help"], ["label", "-h"], ["label"]])
def test_cli_group_help_lists_its_subcommands_one_line_each(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in [n for n in COMMANDS if n.startswith("label ")]:
        assert re.search(rf"^  {name} +{re.escape(COMMANDS[name].summary)}$", out, re.MULTILINE), name
    assert "  sft " not in out
    with pytest.raises(SystemExit, match="unknown subcommand 'serv'[\\s\\S]*label serve"):
        main(["label", "serv"])


def test_print_config_prints_resolved_values(capsys):
    assert main(["sft", "--set", "epochs=5", "--print-config"]) == 0
    assert "epochs: 5" in capsys.readouterr().out


# --------------------------------------------------------------------------- the shared run block


def test_every_stage_reads_its_run_settings_from_one_block():
    from instructrl.config import RunSettings, has_run_block
    from instructrl.eval import run as eval_run
    from instructrl.stages import ppo, pretrain, rm, sft

    for module in (pretrain, sft, rm, ppo, eval_run):
        assert has_run_block(module.Config), module.__name__
        assert isinstance(module.Config().run, RunSettings)
        names = {f.name for f in dataclasses.fields(module.Config)}
        assert not names & {"seed", "threads", "device", "precision", "resume", "max_nonfinite_steps"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo", "eval"])
def test_old_top_level_run_keys_map_onto_the_run_block(stage, tmp_path):
    config_cls = importlib.import_module(COMMANDS[stage].module).Config
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "device": "cpu"}))
    from_yaml = load_config(config_cls, path, ["threads=2", "run.seed=4"])  # --set wins over the file
    assert (from_yaml.run.seed, from_yaml.run.device, from_yaml.run.threads) == (4, "cpu", 2)
    assert load_config(config_cls, None, ["seed=5"]).run.seed == 5
    assert "seed" not in to_dict(from_yaml) and to_dict(from_yaml)["run"]["seed"] == 4


def test_both_spellings_of_a_run_key_in_one_file_are_refused(tmp_path):
    from instructrl.stages import sft

    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "run": {"seed": 4}}))
    with pytest.raises(ConfigError, match=r"'seed' is the old name of 'run.seed'"):
        load_config(sft.Config, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.device=gpu", "run.device: must be 'auto'"),
        ("device=tpu", "run.device: must be 'auto'"),
        ("run.precision=fp16", "run.precision: must be one of"),
        ("run.max_nonfinite_steps=0", "run.max_nonfinite_steps: must be > 0"),
        ("run.threads=-1", "run.threads: must be >= 0"),
        ("run.sed=1", "did you mean 'run.seed'"),
    ],
)
def test_one_device_and_precision_check_for_every_stage(override, message):
    from instructrl.eval import run as eval_run
    from instructrl.stages import ppo, pretrain, rm, sft

    for module in (pretrain, sft, rm, ppo, eval_run):
        with pytest.raises(ConfigError, match=message):
            load_config(module.Config, None, [override])


def test_stages_that_cannot_honour_bf16_refuse_it():
    from instructrl.eval import run as eval_run
    from instructrl.stages import ppo, rm, sft

    assert load_config(sft.Config, None, ["run.precision=bf16"]).run.precision == "bf16"
    assert load_config(ppo.Config, None, ["precision=bf16"]).run.precision == "bf16"
    for module in (rm, eval_run):
        with pytest.raises(ConfigError, match="run.precision: .* float32 only"):
            load_config(module.Config, None, ["run.precision=bf16"])


def test_run_settings_that_do_not_change_results_do_not_block_a_resume():
    from instructrl.stages import sft

    saved = resume_fingerprint(sft.Config())
    neutral = RunSettings(threads=2, resume=False, force_resume=False, max_nonfinite_steps=9)
    check_resume_compatible(saved, sft.Config(run=neutral), "run")
    with pytest.raises(UserFacingError, match=r"changed: run.seed\b.*--set run.resume=false"):
        check_resume_compatible(saved, sft.Config(run=RunSettings(seed=1)), "run")
    with pytest.raises(UserFacingError, match=r"changed: run.precision"):
        check_resume_compatible(saved, sft.Config(run=RunSettings(precision="bf16")), "run")


def test_a_fingerprint_saved_with_top_level_run_keys_still_compares():
    from instructrl.stages import sft

    old = {k: v for k, v in resume_fingerprint(sft.Config()).items() if k != "run"}
    old.update(seed=0, precision="fp32", device="auto", tensorboard=False)  # before the run block
    check_resume_compatible(old, sft.Config(), "run")
    with pytest.raises(UserFacingError, match=r"changed: run.seed"):
        check_resume_compatible({**old, "seed": 7}, sft.Config(), "run")


def test_cli_resume_flags_and_old_keys_set_the_run_block(capsys):
    assert main(["sft", "--force-resume", "--set", "seed=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["force_resume"] is True and printed["run"]["seed"] == 2 and "seed" not in printed
