"""The ``instructrl`` command line: one entry point, one subcommand per stage.

Every command takes ``--config FILE.yaml`` and any number of ``--set key=value`` overrides (dotted keys
reach nested blocks, e.g. ``--set kl.target=6``). The command prints the resolved config before it
starts and the stage saves it beside its outputs. ``instructrl CMD --help`` lists every option with its
type, default and documentation, generated from the config dataclass itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from instructrl.config import ConfigError, describe, dump_config, load_config, run_key


@dataclass(frozen=True)
class Command:
    module: str
    """Module defining ``Config`` (a dataclass) and ``run(cfg) -> dict``."""
    summary: str
    """One line for the command list."""
    flags: dict[str, str] = field(default_factory=dict)
    """Convenience flags mapped to ``--set`` overrides, e.g. ``{"--quick": "quick=true"}``; an override
    holding ``{}`` makes a flag that takes a value, e.g. ``{"--db": "db={}"}`` for ``--db FILE``."""


_DB_FLAG = {"--db": "db={}"}
"""``--db FILE.sqlite`` for the labeling commands (same as ``--set db=FILE.sqlite``)."""

RESUME_FLAGS = {
    "--resume": ("resume", "continue from the newest checkpoint in output_dir (the default)"),
    "--force-resume": ("force_resume", "resume even though the config changed in a way that alters results"),
}
"""Flags setting a key to true, for every command whose config has the key (``run.resume`` / ``run.force_resume``
in a stage's run block, ``resume`` / ``force_resume`` at the top level of the demo's)."""

COMMANDS: dict[str, Command] = {
    "pretrain": Command("instructrl.stages.pretrain", "Train the tokenizer and the base causal LM on a text corpus."),
    "sft": Command("instructrl.stages.sft", "Supervised fine-tuning on demonstrations (stage 1)."),
    "rm": Command("instructrl.stages.rm", "Train the reward model on K-wise rankings (stage 2)."),
    "rm score": Command("instructrl.stages.rm_score", "Score (prompt, response) pairs in a file with a reward model."),
    "ppo": Command("instructrl.stages.ppo", "PPO / PPO-ptx against the reward model (stage 3)."),
    "generate": Command("instructrl.stages.generate", "Sample responses from a saved policy for a file of prompts."),
    "eval": Command("instructrl.eval.run", "Win rates, alignment tax and over-optimization for saved policies."),
    "data prepare": Command("instructrl.data.prepare", "Prompt pipeline: dedup, per-user caps, PII scrub, splits."),
    "sandbox make": Command("instructrl.sandbox.make", "Write a world's corpus, prompts and labels to a folder."),
    "demo": Command("instructrl.demo", "The whole InstructGPT pipeline on the sandbox.", {"--quick": "quick=true"}),
    "label serve": Command("instructrl.label.serve", "Start the labeling web app.", _DB_FLAG),
    "label create-labeler": Command(
        "instructrl.label.create_labeler", "Add or change a labeler/admin account (prints its secret once).", _DB_FLAG
    ),
    "label load-prompts": Command(
        "instructrl.label.load_prompts", "Load prompts (e.g. data prepare output) into a labeling database.", _DB_FLAG
    ),
    "label add-samples": Command(
        "instructrl.label.add_samples", "Sample K responses per comparison prompt from a saved policy.", _DB_FLAG
    ),
    "label assign": Command(
        "instructrl.label.assign", "Assign unassigned items to labelers, some to several for agreement.", _DB_FLAG
    ),
    "label export": Command(
        "instructrl.label.export", "Export labels as SFT demonstrations or K-way comparisons (JSONL).", _DB_FLAG
    ),
    "label stats": Command(
        "instructrl.label.stats", "Labeling progress, skip reasons and inter-labeler agreement.", _DB_FLAG
    ),
}


DATA_PARALLEL_COMMANDS = ("sft", "rm", "ppo")
"""Commands that run data-parallel under ``accelerate launch`` / ``torchrun`` (``--num-processes``)."""


def launcher_command(
    name: str, rest: list[str], num_processes: int | None, accelerate_config: str | None
) -> list[str]:
    """The ``accelerate launch`` command line that reruns ``instructrl NAME REST`` in several processes.

    With only ``num_processes``: one machine, ``--multi_gpu`` (one process per GPU; on a machine without GPUs
    accelerate runs CPU processes over gloo). With ``accelerate_config`` (e.g. ``configs/accelerate/*.yaml``)
    that file decides, and ``num_processes`` (if given) overrides its process count.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        command += ["--config_file", accelerate_config]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    return command + ["-m", "instructrl", *name.split(), *rest]


def _strip_launch_flags(rest: list[str]) -> list[str]:
    """``rest`` without ``--num-processes N`` / ``--accelerate-config FILE`` (both ``--flag V`` and ``--flag=V``)."""
    out, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg in ("--num-processes", "--accelerate-config"):
            skip = True
        elif not arg.startswith(("--num-processes=", "--accelerate-config=")):
            out.append(arg)
    return out


def _available() -> dict[str, Command]:
    """Commands whose module exists in this installation (stages land one issue at a time)."""
    out = {}
    for name, cmd in COMMANDS.items():
        try:
            spec = importlib.util.find_spec(cmd.module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            out[name] = cmd
    return out


def _top_help(commands: dict[str, Command], group: str | None = None) -> str:
    """The command list: every command, or with ``group`` (e.g. "label") that group's subcommands."""
    prefix = f"{group} " if group else ""
    listed = {name: cmd for name, cmd in commands.items() if name.startswith(prefix)}
    width = max((len(n) for n in listed), default=8)
    command = f"{group} SUBCOMMAND" if group else "COMMAND"
    lines = [f"usage: instructrl {command} [--config FILE.yaml] [--set key=value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in listed.items()]
    lines += ["", f"Run 'instructrl {command} --help' for every option of a command."]
    return "\n".join(lines)


def _resolve(argv: list[str], commands: dict[str, Command]) -> tuple[str, list[str]]:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in commands:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in commands:
        return argv[0], argv[1:]
    groups = sorted({n.split()[0] for n in commands if " " in n})
    if argv and argv[0] in groups:
        if argv[1:2] in ([], ["-h"], ["--help"]):
            print(_top_help(commands, argv[0]))
            raise SystemExit(0)
        raise SystemExit(f"instructrl {argv[0]}: unknown subcommand '{argv[1]}'\n\n{_top_help(commands, argv[0])}")
    import difflib

    wanted = argv[0] if argv else ""
    close = difflib.get_close_matches(wanted, list(commands), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise SystemExit(f"instructrl: unknown command '{wanted}'{hint}\n\n{_top_help(commands)}")


def _quiet_libraries() -> None:
    """Keep transformers' load reports and per-file progress bars out of our progress output."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help(commands))
        return 0
    name, rest = _resolve(argv, commands)
    cmd = commands[name]
    _quiet_libraries()
    module = importlib.import_module(cmd.module)
    config_cls = module.Config
    parser = argparse.ArgumentParser(
        prog=f"instructrl {name}",
        description=(module.__doc__ or cmd.summary).strip(),
        epilog="config options (set in the YAML file or with --set key=value):\n" + describe(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of config options (default: the built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one option"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if name in DATA_PARALLEL_COMMANDS:
        parser.add_argument(
            "--num-processes",
            type=int,
            metavar="N",
            help="run data-parallel in N processes through 'accelerate launch' (one per GPU; CPU processes without)",
        )
        parser.add_argument(
            "--accelerate-config",
            metavar="FILE",
            help="launch through 'accelerate launch --config_file FILE' (see configs/accelerate/)",
        )
    for flag, override in cmd.flags.items():
        if "{}" in override:  # a flag with a value, e.g. --db FILE
            parser.add_argument(
                flag,
                action="append",
                type=override.format,
                dest="overrides",
                metavar="VALUE",
                help=f"same as --set {override.format('VALUE')}",
            )
        else:
            parser.add_argument(
                flag, action="append_const", const=override, dest="overrides", help=f"same as --set {override}"
            )
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    for flag, (key, help_text) in RESUME_FLAGS.items():
        key = run_key(config_cls, key)
        if (key.startswith("run.") or key in config_fields) and flag not in cmd.flags:
            parser.add_argument(flag, action="append_const", const=f"{key}=true", dest="overrides", help=help_text)
    args = parser.parse_args(rest)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"instructrl {name}: config error: {e}", file=sys.stderr)
        return 2
    wants_launch = (getattr(args, "num_processes", None) or 1) > 1 or getattr(args, "accelerate_config", None)
    if wants_launch and not args.print_config:
        from instructrl.utils.distributed import launched_world_size

        if launched_world_size() == 1:  # not yet under a launcher: start one that reruns this command
            import subprocess

            command = launcher_command(name, _strip_launch_flags(rest), args.num_processes, args.accelerate_config)
            print("# " + " ".join(command), flush=True)
            return subprocess.call(command)
    if os.environ.get("RANK", "0") != "0":  # under a launcher rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    print(f"# instructrl {name}: resolved config\n{dump_config(cfg)}", flush=True)
    if args.print_config:
        return 0
    from instructrl.errors import UserFacingError

    try:
        module.run(cfg)
    except UserFacingError as e:
        print(f"instructrl {name}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        from instructrl.utils.guards import is_disk_full  # imports torch: only when needed (label commands)

        if not is_disk_full(e):
            raise
        print(
            f"instructrl {name}: error: no space left on the device ({e}); files already written are intact. "
            "Free some space and run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"\ninstructrl {name}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
