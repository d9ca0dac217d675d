"""Experiment trackers (TensorBoard, Weights & Biases, trackio, MLflow, …) through accelerate's tracking API.

``run.report_to`` names the trackers a training stage mirrors its metrics to, besides ``metrics.jsonl`` (always
written). The trackers are accelerate's own classes (``accelerate.tracking``), used without an ``Accelerator``:
instructrl runs its loops itself (:mod:`instructrl.utils.distributed`), so it creates the trackers on the main
process only, logs each step under the stage's own step number and finishes them when the metrics writer closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

NO_TRACKERS = "none"
ALL_TRACKERS = "all"


def parse_report_to(report_to: str | Sequence[str], tensorboard: bool = False) -> list[str]:
    """The tracker names in ``report_to`` (a list or a comma-separated string; ``"none"`` or empty for none),
    lower-cased, without repeats; ``tensorboard=True`` (the deprecated ``run.tensorboard``) adds "tensorboard"."""
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [name.strip().lower() for name in [*items, "tensorboard" if tensorboard else ""]]
    return [name for name in dict.fromkeys(names) if name and name != NO_TRACKERS]


def known_trackers() -> list[str]:
    """Every tracker accelerate supports, installed or not."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def installed_trackers() -> list[str]:
    """The trackers whose package is installed here."""
    from accelerate.tracking import get_available_trackers

    return sorted(str(tracker) for tracker in get_available_trackers())


def pip_extra(name: str) -> str:
    """The install command for tracker ``name``'s optional extra (pyproject.toml declares one per tracker)."""
    return f"pip install 'instructrl[{name.replace('_', '-')}]'"


def tracker_problem(names: Sequence[str]) -> str | None:
    """Why ``names`` cannot be used (an unknown name, a missing package), or None when they can."""
    if not names:
        return None
    known, installed = known_trackers(), installed_trackers()
    for name in names:
        if name == ALL_TRACKERS:
            if not installed:
                return f"'all' found no tracker package installed; install one, e.g. {pip_extra('tensorboard')}"
        elif name not in known:
            return f"unknown tracker {name!r}; choose from {[*known, ALL_TRACKERS, NO_TRACKERS]}"
        elif name not in installed:
            return f"the {name!r} tracker needs its package: {pip_extra(name)}"
    return None


def flat_hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` (a nested dict) as ``{"run.seed": 0, …}`` with scalar values, the form every tracker takes;
    lists become their text (``"[0.9, 0.95]"``) and empty mappings are left out."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = str(value) if isinstance(value, (list, tuple)) else value
    return flat


def start_trackers(
    names: Sequence[str],
    *,
    project: str,
    stage: str,
    out: Path,
    hyperparameters: dict[str, Any],
    resume_step: int | None = None,
) -> list[Any]:
    """Start the trackers ``names`` (``"all"``: every installed one) for one stage's run and log its
    ``hyperparameters``; returns accelerate ``GeneralTracker`` objects.

    Trackers that keep local files (tensorboard, aim, dvclive) write under ``out/<tracker>``; the others file the
    run under ``project``, named after the stage and its output folder. A resumed run (``resume_step``) logs its
    steps after the checkpoint's; TensorBoard hides what the interrupted run logged past it (``purge_step``).
    """
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

    run_name = f"{stage} ({out})"
    # What accelerate's init_trackers would receive as init_kwargs: each tracker's own keyword for these settings.
    init_kwargs = {
        "tensorboard": {"purge_step": resume_step + 1} if resume_step else {},
        "wandb": {"name": run_name},
        "trackio": {"name": run_name},
        "mlflow": {"run_name": run_name},
        "swanlab": {"experiment_name": run_name},
        "clearml": {"task_name": run_name},
        "dvclive": {"dir": str(out / "dvclive")},
    }
    trackers = []
    try:
        for logger_type in filter_trackers(list(names), out):
            name = str(logger_type)
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            first = (stage, out / name) if tracker_class.requires_logging_directory else (project,)
            tracker = tracker_class(*first, **init_kwargs.get(name, {}))
            tracker.start()
            trackers.append(tracker)
            tracker.store_init_configuration({"stage": stage, **hyperparameters})
    except BaseException:
        finish_trackers(trackers)
        raise
    return trackers


def log_to_trackers(trackers: Sequence[Any], step: int, metrics: dict[str, Any]) -> None:
    """Log the numbers among ``metrics`` at ``step`` (text is kept for the JSONL file)."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for tracker in trackers:
        tracker.log(numbers, step=step)


def finish_trackers(trackers: Sequence[Any]) -> None:
    """Finish (flush and close) every tracker, each even when an earlier one fails."""
    errors = []
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as error:  # the others still close; the first error is raised below
            errors.append(error)
    if errors:
        raise errors[0]
