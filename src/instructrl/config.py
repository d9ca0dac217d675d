"""Typed configuration: dataclasses with a docstring per field, loaded from YAML plus ``--set`` overrides.

Every stage has one config dataclass. Each field carries an *attribute docstring* (a string literal on
the line after the field); :func:`field_docs` reads those with ``ast`` so that ``--help``, the saved
config and the docs all come from one place.

Loading is strict: an unknown key is an error that names the key and suggests the closest valid one,
and a value of the wrong type is an error naming the field. After construction the config's
``validate()`` runs, so that invalid values fail before any work starts. Configs are never mutated
after loading; values derived from them are computed where needed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import operator
import textwrap
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# --------------------------------------------------------------------------- field documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field name of dataclass ``cls`` (and its bases) to its attribute docstring."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield ``(dotted_name, type, default, doc)`` for every leaf field, descending into nested configs."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        yield prefix + f.name, tp, default, docs.get(f.name, "")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return type_name(args[0]) + "?" if len(args) == 1 else "|".join(type_name(a) for a in args)
    if origin in (list, tuple):
        args = get_args(tp)
        inner = type_name(args[0]) if args else "any"
        return f"{origin.__name__}[{inner}]"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type) -> str:
    """Human-readable list of every option with its type, default and documentation (for ``--help``)."""
    lines = []
    for name, tp, default, doc in iter_fields(cls):
        shown = "(required)" if default is dataclasses.MISSING else repr(default)
        lines.append(f"  {name} ({type_name(tp)}, default {shown})")
        if doc:
            lines.extend("      " + ln for ln in textwrap.wrap(doc, 90))
    return "\n".join(lines)


# --------------------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert the few lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue  # try the next member of the union
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping; unknown keys raise with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if has_run_block(cls):
        data = nest_run_keys(data, prefix)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}' for {cls.__name__}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field was not given
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists so it round-trips through YAML)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as YAML so numbers, booleans, lists and null work."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus ``key=value`` overrides, then validate it."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        data = nest_run_keys(loaded) if has_run_block(cls) else loaded
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) == 1 and has_run_block(cls):
            keys = run_key(cls, keys[0]).split(".")
        _merge_override(data, keys, value)
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Run ``validate()`` on the config and every nested config (innermost first)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def save_config(cfg: Any, path: str | Path) -> None:
    from instructrl.utils.io import atomic_write_text

    atomic_write_text(path, dump_config(cfg))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def replace(cfg: T, **changes: Any) -> T:
    """A validated copy of ``cfg`` with some fields changed (configs are never mutated in place)."""
    new = dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
    validate(new)
    return new


# --------------------------------------------------------------------------- the shared run settings


PRECISION_NAMES = ("fp32", "bf16")
"""Values of ``run.precision`` (``stages.common.PRECISIONS`` maps them to autocast dtypes)."""

SHARDING_NAMES = ("none", "fsdp")
"""Values of ``run.sharding`` (:mod:`instructrl.utils.sharding` applies 'fsdp')."""


@dataclass
class RunSettings:
    """How a stage runs, one block shared by pretrain, sft, rm, ppo and eval (``run:`` in YAML, ``--set run.seed=3``).

    Older configs set these keys at the top level (``seed: 3``, ``--set seed=3``); they are read into this block.
    """

    seed: int = 0
    """Seed of everything random in the stage: initialization, data order, held-out splits, dropout, sampling and
    (eval) the labeler judge."""
    threads: int = 0
    """CPU threads for torch (0 = torch default)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """'bf16': bf16 mixed precision (autocast) for the forward passes (PPO: rollout generation too); weights,
    gradients, Adam states, log-sum-exps, values, losses and advantages stay float32. Faster where matmuls have a
    bf16 path (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), and more so the larger the model (the
    0.94M-parameter sandbox model is too small for matmuls to dominate; measurements: benchmarks/RESULTS.md);
    PPO's losses track fp32 within the tolerance tested in tests/test_ppo_fast.py. 'fp32': everything in float32.
    pretrain, sft and ppo only (rm and eval run in float32 and refuse 'bf16')."""
    resume: bool = True
    """Continue from the newest checkpoint in output_dir if there is one (eval keeps no checkpoints)."""
    force_resume: bool = False
    """Resume even when the config changed in a way that alters results (the run is then not reproducible)."""
    report_to: str | list[str] = "none"
    """Experiment trackers to mirror the training metrics to, as a list or a comma-separated string: any tracker
    accelerate supports (tensorboard, wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab), 'all' for
    every one installed, or 'none'. metrics.jsonl is written either way. Each needs its package (pip install
    'instructrl[wandb]', …); local ones write under output_dir/<tracker>; the config goes along as hyperparameters.
    Not eval."""
    tracker_project: str = "instructrl"
    """The project (wandb, trackio, comet_ml, swanlab, clearml) or experiment (mlflow) that report_to's trackers
    file the run under; each run is named after its stage and output_dir."""
    tensorboard: bool = False
    """Deprecated: the same as adding 'tensorboard' to report_to."""
    max_nonfinite_steps: int = 3
    """Stop with an error after this many optimizer steps (PPO: iterations) in a row with a NaN/inf loss or
    gradient (each such step is skipped and counted in the metrics as ``nonfinite_skipped``); eval trains nothing
    and ignores it."""
    world: str = "sandbox"
    """The world that supplies whatever data you did not give a file for (prompts, demonstrations, rankings, corpus)
    and, in eval, the held-out prompts and gold judge: 'sandbox' (built-in), 'path/to/file.py:factory' or
    'package.module:factory', where ``factory(seed)`` returns an object with the methods of
    :class:`instructrl.world.World`; the seed is the stage's ``sandbox_seed``. Template: examples/shop_world.py."""
    sharding: Literal["none", "fsdp"] = "none"
    """How N processes (``--num-processes``, ``accelerate launch``, ``torchrun``) hold the models of sft, rm and
    ppo. 'none': data parallelism (DDP), every process holds full copies of every model and optimizer state.
    'fsdp': FSDP2 (``torch.distributed.fsdp.fully_shard``) splits the trained models' weights, gradients and
    AdamW states over the processes (each holds ~1/N; see README 'Scaling up' for what fits); checkpoints are
    written by every process with ``torch.distributed.checkpoint``. One process holds everything either way, so
    'fsdp' then trains exactly like 'none' (and reads sharded checkpoints)."""

    def validate(self) -> None:
        from instructrl.utils.device import DEVICE_HELP, valid_device_name

        require(self.threads >= 0, "run.threads", f"must be >= 0, got {self.threads}")
        steps = self.max_nonfinite_steps
        require(steps > 0, "run.max_nonfinite_steps", f"must be > 0, got {steps}")
        require(valid_device_name(self.device), "run.device", f"must be {DEVICE_HELP}")
        require_world(self.world, "run.world")
        require(
            self.precision in PRECISION_NAMES,
            "run.precision",
            f"must be one of {list(PRECISION_NAMES)}, got {self.precision!r}",
        )
        require(
            self.sharding in SHARDING_NAMES,
            "run.sharding",
            f"must be one of {list(SHARDING_NAMES)}, got {self.sharding!r}",
        )
        if self.tensorboard:
            warnings.warn("run.tensorboard is deprecated: use run.report_to=tensorboard", FutureWarning, stacklevel=2)
        from instructrl.utils.trackers import tracker_problem

        problem = tracker_problem(self.tracker_names())  # imports accelerate only when trackers are named
        require(problem is None, "run.report_to", str(problem))

    def tracker_names(self) -> list[str]:
        """The trackers of ``report_to``, with 'tensorboard' for the deprecated ``tensorboard: true``."""
        from instructrl.utils.trackers import parse_report_to

        return parse_report_to(self.report_to, tensorboard=self.tensorboard)


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunSettings))
"""The settings of the ``run`` block, which older configs set at the top level."""


def has_run_block(cls: type) -> bool:
    """Whether config class ``cls`` holds its run settings in a ``run: RunSettings`` block."""
    return any(f.name == "run" and f.type in (RunSettings, "RunSettings") for f in dataclasses.fields(cls))


def run_key(cls: type, key: str) -> str:
    """The key ``cls`` reads ``key`` under: ``run.seed`` for an old top-level ``seed`` where there is a run block."""
    own = {f.name for f in dataclasses.fields(cls)}
    return f"run.{key}" if key in RUN_KEYS and key not in own and has_run_block(cls) else key


def nest_run_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of ``data`` with old top-level run settings (``seed: 3``) moved into its ``run`` block (``run.seed``).

    Setting both spellings of one key is refused: which one was meant cannot be told.
    """
    flat = [key for key in RUN_KEYS if key in data]
    if not flat:
        return data
    block = data.get("run")
    block = dict(block) if isinstance(block, dict) else {}
    both = [key for key in flat if key in block]
    if both:
        raise ConfigError(
            f"'{prefix}{both[0]}' and '{prefix}run.{both[0]}' are both set; '{both[0]}' is the old name of "
            f"'run.{both[0]}': keep only 'run.{both[0]}'"
        )
    block.update({key: data[key] for key in flat})
    return {**{k: v for k, v in data.items() if k not in flat}, "run": block}


# --------------------------------------------------------------------------- validation helpers


def require_world(spec: str, setting: str) -> None:
    """``spec`` names a world ('sandbox', 'file.py:factory' with an existing file, 'package.module:factory'),
    checked up front without importing it (:func:`instructrl.world.load_world` checks the rest)."""
    if spec != "sandbox":
        from instructrl.world import WorldError, check_world_spec

        try:
            check_world_spec(spec, setting)
        except WorldError as e:
            raise ConfigError(str(e)) from None


def require(condition: bool, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def require_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(value > 0, name, f"must be > 0, got {value}")


def require_non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(value >= 0, name, f"must be >= 0, got {value}")


def require_fraction(cfg: Any, *names: str, inclusive_low: bool = True, inclusive_high: bool = True) -> None:
    for name in names:
        v = getattr(cfg, name)
        ok = (v >= 0 if inclusive_low else v > 0) and (v <= 1 if inclusive_high else v < 1)
        require(ok, name, f"must lie in {'[' if inclusive_low else '('}0, 1{']' if inclusive_high else ')'}, got {v}")


def require_path_exists(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value == "":
            continue
        require(Path(value).exists(), name, f"path does not exist: {value}")


def require_own_data(cfg: Any, name: str, own: Sequence[str], off: str | None = None) -> None:
    """No silent sandbox data. ``name`` is a data file whose unset value means "the sandbox's"; once the user gave
    any of the stage's other data files (``own``), it must be set too, so that a run on the user's data never mixes
    in the sandbox's. ``off`` names the setting that turns that data source off instead (e.g. ``ptx_fraction=0``).
    Dotted names reach nested blocks (``ptx.data``)."""
    given = [f"{field}={operator.attrgetter(field)(cfg)}" for field in own if operator.attrgetter(field)(cfg)]
    if given and operator.attrgetter(name)(cfg) is None:
        fix = f"set {name}=FILE.jsonl" + (f" or {off}" if off else "")
        raise ConfigError(
            f"{name}: unset, so this run would read the sandbox's data beside your own ({', '.join(given)}); {fix}"
        )


RESULT_NEUTRAL_KEYS = frozenset(
    {"resume", "threads", "output_dir", "force_resume", "progress", "max_nonfinite_steps", "guardrails"}
    | {"sharded_sampling", "frozen_models"}  # how sharded PPO samples and holds frozen models
    | {"report_to", "tracker_project", "tensorboard"}  # where metrics are mirrored to
    | {"baselines"}  # the RM stage's reference orderings, measured after training
)
"""Top-level keys (and keys of the ``run`` block) that never change a run's results, so changing them does not
block a resume (PPO's ``guardrails`` only observe; their ``stop`` ends a run early without changing what it
computed up to then)."""


def resume_fingerprint(cfg: Any) -> dict[str, Any]:
    """The part of a config that determines results; a resume with a different fingerprint is refused."""
    return _without_neutral_keys(to_dict(cfg))


KEYS_ADDED_LATER = {"world": "sandbox", "sharding": "none"}
"""Settings added after fingerprints were first saved (``run.world``, the demo's ``world``, ``run.sharding``), with
the value every earlier run had: a fingerprint without them matches that value."""


def _without_neutral_keys(fingerprint: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in fingerprint.items() if k not in RESULT_NEUTRAL_KEYS}
    if isinstance(kept.get("run"), dict):
        kept["run"] = {k: v for k, v in kept["run"].items() if k not in RESULT_NEUTRAL_KEYS}
    return kept


def changed_keys(saved: dict[str, Any], cfg: Any) -> list[str]:
    """Keys whose value in ``cfg`` differs from the saved fingerprint, dotted inside nested blocks (``run.seed``).

    A fingerprint saved before the ``run`` block existed has its run settings at the top level; they are compared
    with the block's.
    """
    if has_run_block(type(cfg)):
        saved = nest_run_keys(saved)
    # a key made result-neutral later (run.tensorboard) may be in a fingerprint saved before it was
    return _differences(_without_neutral_keys(saved), resume_fingerprint(cfg))


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved[key] if key in saved else KEYS_ADDED_LATER.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(prefix + key)
    return changed


def check_resume_compatible(saved: dict[str, Any], cfg: Any, where: str) -> None:
    """Raise a clear error naming the changed keys when ``cfg`` would alter a resumed run's results.

    With ``force_resume`` set (``cfg.run.force_resume``) the resume goes ahead with a warning instead (e.g. a
    smaller micro-batch after running out of memory: the user accepts that the run is no longer bit-for-bit
    reproducible).
    """
    changed = changed_keys(saved, cfg)
    if not changed:
        return
    settings = cfg.run if has_run_block(type(cfg)) else cfg
    if getattr(settings, "force_resume", False):
        import sys

        print(
            f"warning: {where}: resuming despite a changed config (changed: {', '.join(changed)}) because "
            "force_resume is set; the result will differ from an uninterrupted run",
            file=sys.stderr,
            flush=True,
        )
        return
    from instructrl.errors import UserFacingError

    raise UserFacingError(
        f"{where} holds a checkpoint made with a different config (changed: {', '.join(changed)}); "
        f"resuming would not reproduce the run. Use another output_dir, --set {run_key(type(cfg), 'resume')}=false to "
        "start over, or --force-resume to continue with the new settings anyway."
    )
