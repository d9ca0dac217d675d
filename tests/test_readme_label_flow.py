"""The README's labeling commands, run as written and in order, in a folder laid out as ``make demo`` leaves it.

``make demo`` would leave the prepared prompt splits in ``runs/demo/prepared/`` and the SFT policy in
``runs/demo/sft/``. Here the splits come from the demo's own first two steps (sandbox data and ``data prepare``,
at the quick size), cut to a few prompts each, and the policy is a tiny random model, so the test takes seconds
instead of the demo's minutes.

Each line is split as the shell splits it and given to the ``instructrl`` entry point (``cli.main``) in this
process; ``label serve`` runs in a process of its own, answers its login page, and is stopped as Ctrl-C would.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from instructrl.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
ACTIVATE = ". .venv/bin/activate"
"""The block's first line: it puts ``make``'s environment on the PATH, which the test does itself."""
PROMPTS_PER_SPLIT = 3


def readme_label_commands() -> list[str]:
    """The shell lines of the first ``bash`` block of the README's "Collecting human feedback" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Collecting human feedback") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def _lay_out_the_demo_outputs(root: Path, tiny_lm_dir: Path) -> None:
    from instructrl import demo

    steps = {step.name: step for step in demo.plan(demo.Config(output_dir=str(root / "runs/demo"), quick=True))}
    for name in ("sandbox", "prepare"):
        module = importlib.import_module(steps[name].module)
        module.run(load_config(module.Config, None, list(steps[name].overrides)))
    for split in ("train", "valid"):  # a few prompts of each split: sampling for all would take minutes
        path = root / f"runs/demo/prepared/{split}.jsonl"
        path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:PROMPTS_PER_SPLIT]))
    shutil.copytree(tiny_lm_dir, root / "runs/demo/sft")


def _serve_until_it_answers(argv: list[str]) -> None:
    # -X faulthandler: should Ctrl-C not stop the server, SIGABRT makes it print every thread's stack
    proc = subprocess.Popen(
        [argv[0], "-X", "faulthandler", *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            match = re.search(r" at (http://\S+/) ", line)
            if match:
                with urllib.request.urlopen(match.group(1) + "login", timeout=30) as response:
                    assert response.status == 200
                break
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            stacks = proc.communicate(timeout=30)[0]
            raise AssertionError(f"label serve still runs 30 s after Ctrl-C:\n{''.join(printed)}{stacks}") from None
    assert "label serve: stopped" in output, output
    assert '"GET /login" 200' in output  # the access log is on by default


def test_readme_labeling_commands_run_in_order(tmp_path, tiny_lm_dir, monkeypatch):
    from instructrl.cli import main

    commands = readme_label_commands()
    assert commands[0].startswith(ACTIVATE)
    assert all(c.startswith("instructrl label ") for c in commands[1:]), commands
    _lay_out_the_demo_outputs(tmp_path, tiny_lm_dir)
    monkeypatch.chdir(tmp_path)
    for command in commands[1:]:
        argv = shlex.split(command, comments=True)  # what the shell passes to the ``instructrl`` entry point
        if argv[:3] == ["instructrl", "label", "serve"]:
            # a process of its own, stopped as Ctrl-C stops it; on a free port (8000 may be taken here)
            _serve_until_it_answers([sys.executable, "-m", "instructrl", *argv[1:], "--set", "port=0"])
            continue
        assert main(argv[1:]) == 0, command  # in this process: the commands' imports are paid once
    assert (tmp_path / "labels.sqlite").is_file()
    assert (tmp_path / "comparisons.jsonl").is_file() and (tmp_path / "demonstrations.jsonl").is_file()
