"""Experiment trackers (``run.report_to``): names checked up front, every training stage's metrics in TensorBoard
event files equal to its metrics.jsonl, resumed runs at the right steps, MLflow offline on a local SQLite store,
trackers finished on errors, and the deprecated ``run.tensorboard``."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from instructrl.cli import main
from instructrl.config import ConfigError, RunSettings, check_resume_compatible, load_config, resume_fingerprint
from instructrl.stages import pretrain as pretrain_stage
from instructrl.stages import sft
from instructrl.utils.trackers import (
    flat_hyperparameters,
    installed_trackers,
    known_trackers,
    parse_report_to,
    tracker_problem,
)

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (pip install -e '.[dev]')"
)
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("alembic") is None,
    reason="MLflow's client with a SQLite store is not installed (pip install -e '.[dev]')",
)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the setting


def test_report_to_takes_a_list_or_a_comma_string_and_the_old_tensorboard_switch():
    assert parse_report_to("none") == [] and parse_report_to("") == [] and parse_report_to([]) == []
    assert parse_report_to(" TensorBoard, wandb ,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to(["mlflow", "none"]) == ["mlflow"]
    assert parse_report_to("none", tensorboard=True) == ["tensorboard"]
    assert parse_report_to("tensorboard", tensorboard=True) == ["tensorboard"]


def test_an_unknown_or_uninstalled_tracker_is_refused_naming_the_setting_and_the_extra():
    assert tracker_problem([]) is None
    assert "unknown tracker 'tensorbored'" in tracker_problem(["tensorbored"])
    with pytest.raises(ConfigError, match=r"run\.report_to: unknown tracker 'nope'; choose from \[.*'wandb'"):
        load_config(sft.Config, overrides=["run.report_to=tensorboard,nope"])
    missing = sorted(set(known_trackers()) - set(installed_trackers()))
    if not missing:
        pytest.skip("every tracker accelerate supports is installed here")
    extra = missing[0].replace("_", "-")
    with pytest.raises(ConfigError, match=rf"run\.report_to: .*{missing[0]}.*pip install 'instructrl\[{extra}\]'"):
        load_config(sft.Config, overrides=[f"run.report_to=[{missing[0]}]"])


def test_a_bad_tracker_stops_the_command_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--set", f"output_dir={out}", "--set", "run.report_to=nope"]) != 0
    assert "run.report_to: unknown tracker 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_eval_refuses_trackers():
    from instructrl.eval import run as eval_run

    with pytest.raises(ConfigError, match=r"run\.report_to: eval logs no training metrics"):
        load_config(eval_run.Config, overrides=["run.report_to=tensorboard"])


def test_old_configs_with_tensorboard_true_load_as_report_to_tensorboard(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("tensorboard: true\nseed: 3\n")  # top-level run keys, from before the run block
    with pytest.warns(FutureWarning, match=r"run\.tensorboard is deprecated: use run\.report_to=tensorboard"):
        cfg = load_config(sft.Config, old)
    assert cfg.run.tracker_names() == ["tensorboard"] and cfg.run.seed == 3


def test_tracker_settings_never_block_a_resume():
    saved = resume_fingerprint(sft.Config())
    check_resume_compatible(saved, sft.Config(run=RunSettings(report_to="tensorboard", tracker_project="x")), "run")
    older = {**saved, "run": {**saved["run"], "tensorboard": True}}  # saved while run.tensorboard counted
    check_resume_compatible(older, sft.Config(), "run")


def test_the_config_goes_to_trackers_as_flat_scalar_hyperparameters():
    flat = flat_hyperparameters({"lr": 1e-4, "betas": [0.9, 0.95], "run": {"seed": 0, "device": "cpu"}, "m": None})
    assert flat == {"lr": 1e-4, "betas": "[0.9, 0.95]", "run.seed": 0, "run.device": "cpu", "m": None}


# --------------------------------------------------------------------------- each stage, end to end


TINY_PRETRAIN = ("sandbox_docs=300", "heldout_docs=40", "vocab_size=400", "model.d_model=32", "model.n_layers=1",
                 "model.n_heads=2", "seq_len=32", "batch_size=8", "eval_every=2", "max_steps=4")  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_command(stage: str, data: Path, tiny_lm_dir: Path, tiny_tokenizer) -> list[str]:
    """``instructrl STAGE --set …`` for a run of a few steps in ``data/STAGE``, on inputs written to ``data``."""
    if stage == "pretrain":
        settings = list(TINY_PRETRAIN)
    elif stage == "sft":
        demos = _jsonl(data / "demos.jsonl", [{"prompt": f"Q: {i}\nA:", "response": f" {i} cat"} for i in range(12)])
        settings = [f"model={tiny_lm_dir}", f"data={demos}", "batch_size=4", "epochs=2", "ptx_fraction=0"]
    elif stage == "rm":
        rankings = [{"prompt": f"Q: {i}\nA:", "chosen": " cat", "rejected": " red"} for i in range(12)]
        comparisons = _jsonl(data / "comparisons.jsonl", rankings)
        settings = [f"model={tiny_lm_dir}", f"comparisons={comparisons}", "batch_size=4", "micro_batch_size=0",
                    "eval_every=1"]  # fmt: skip
    else:
        from instructrl.models.reward import reward_model_from_causal_lm

        torch.manual_seed(0)
        reward_model_from_causal_lm(tiny_lm_dir, tiny_tokenizer.pad_token_id).save_pretrained(data / "rm_in")
        tiny_tokenizer.save_pretrained(data / "rm_in")
        prompts = _jsonl(data / "prompts.jsonl", [{"prompt": f"Q: {i}\nA:"} for i in range(4)])
        settings = [f"policy={tiny_lm_dir}", f"reward_model={data / 'rm_in'}", f"prompts={prompts}", "ptx.coef=0",
                    "iterations=3", "batch_size=4", "minibatch_size=2", "generation.max_new_tokens=4",
                    "sample_every=1"]  # fmt: skip
    settings += [f"output_dir={data / stage}", "threads=1", "device=cpu"]
    return [stage, *(arg for item in settings for arg in ("--set", item))]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), …]}`` as TensorBoard reads the event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_tensorboard_matches_jsonl(out: Path, stage: str) -> None:
    rows = metrics_rows(out)
    numbers = {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    scalars = tensorboard_scalars(out / "tensorboard" / stage)
    assert set(scalars) == numbers
    for tag, logged in scalars.items():
        expected = [(row["step"], float(row[tag])) for row in rows if tag in row]
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [value for _, value in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag


@needs_tensorboard
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_each_stage_writes_its_metrics_to_tensorboard(stage, tmp_path, tiny_lm_dir, tiny_tokenizer):
    assert (
        main([*stage_command(stage, tmp_path, tiny_lm_dir, tiny_tokenizer), "--set", "run.report_to=tensorboard"]) == 0
    )
    out = tmp_path / stage
    assert_tensorboard_matches_jsonl(out, stage)
    assert len(metrics_rows(out)) >= 2
    hparams = next((out / "tensorboard" / stage).glob("*/hparams.yml")).read_text()
    assert f"stage: {stage}" in hparams and "run.seed: 0" in hparams


@needs_tensorboard
def test_a_resumed_run_logs_each_step_once_in_tensorboard(tmp_path, tiny_lm_dir, tiny_tokenizer):
    """The first run checkpoints at step 2 and logs steps 1-4; the rerun resumes at 2 and logs 3-4 again, which
    replace the first run's (TensorBoard's purge_step), as metrics.jsonl drops its lines past the checkpoint."""
    command = [*stage_command("pretrain", tmp_path, tiny_lm_dir, tiny_tokenizer), "--set", "save_every=2"]
    assert main([*command, "--set", "run.report_to=tensorboard"]) == 0
    first = metrics_rows(tmp_path / "pretrain")
    # TensorBoard reads a folder's event files in name order, which starts with the second they were made in: a
    # real restart comes later; here both runs share one process, whose file counter alone would order them
    time.sleep(1.1)
    assert main([*command, "--set", "run.report_to=[tensorboard]"]) == 0  # the same trackers, spelled as a list
    assert [row["step"] for row in metrics_rows(tmp_path / "pretrain")] == [1, 2, 3, 4]
    assert metrics_rows(tmp_path / "pretrain") == first  # an exact resume
    assert_tensorboard_matches_jsonl(tmp_path / "pretrain", "pretrain")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """An MLflow tracking store in a local SQLite file: no server, no network."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


def mlflow_runs() -> list:
    import mlflow

    experiment = mlflow.get_experiment_by_name("instructrl")
    return mlflow.search_runs([experiment.experiment_id], output_format="list") if experiment else []


@needs_mlflow
def test_mlflow_offline_gets_the_metrics_the_config_and_a_finished_run(
    mlflow_store, tmp_path, tiny_lm_dir, tiny_tokenizer, monkeypatch
):
    import mlflow

    command = stage_command("pretrain", tmp_path, tiny_lm_dir, tiny_tokenizer)
    assert main([*command, "--set", "run.report_to=mlflow,tensorboard"]) == 0
    (run,) = mlflow_runs()
    rows = metrics_rows(tmp_path / "pretrain")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(row["step"], pytest.approx(row["loss"])) for row in rows]
    assert run.data.params["stage"] == "pretrain" and run.data.params["run.seed"] == "0"
    assert run.data.params["model.d_model"] == "32" and run.info.run_name == f"pretrain ({tmp_path / 'pretrain'})"
    assert run.info.status == "FINISHED"

    # a stage that fails mid-run still finishes its trackers
    def fail_at_step_3(cfg, state, window, step):
        if step == 2:
            raise RuntimeError("failing on purpose")
        return real(cfg, state, window, step)

    real = pretrain_stage.train_step
    monkeypatch.setattr(pretrain_stage, "train_step", fail_at_step_3)
    settings = [*command[2::2], f"output_dir={tmp_path / 'failed'}", "run.report_to=mlflow"]
    with pytest.raises(RuntimeError, match="failing on purpose"):
        pretrain_stage.run(load_config(pretrain_stage.Config, overrides=settings))
    failed = next(r for r in mlflow_runs() if r.info.run_id != run.info.run_id)
    assert failed.info.status == "FINISHED" and mlflow.active_run() is None
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(failed.info.run_id, "loss")] == [1, 2]
