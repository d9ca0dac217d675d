"""Config system: YAML + --set overrides, strict keys with suggestions, type checks, validation, help text."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from instructrl.cli import COMMANDS, main
from instructrl.config import (
    ConfigError,
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


def test_print_config_prints_resolved_values(capsys):
    assert main(["sft", "--set", "epochs=5", "--print-config"]) == 0
    assert "epochs: 5" in capsys.readouterr().out
