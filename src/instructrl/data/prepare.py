"""Prepare a prompt dataset the way InstructGPT prepared API prompts (Ouyang et al. 2022, §3.2, App. A.3).

Steps, in order (every choice is deterministic: the same input file and ``seed`` give byte-identical outputs):

1. **Load** ``{"prompt", "user_id"?, ...}`` records (:func:`instructrl.data.loading.load_prompts`); with
   ``skip_bad`` bad lines are skipped and counted, otherwise the first one stops the run with its line.
2. **Scrub PII** (``scrub_pii``): e-mail addresses, phone numbers, payment-card numbers and IP addresses
   become ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IP]`` (see :mod:`instructrl.data.pii`).
   *Prompts without a user id*: each is its own user ``anon-<h>``, ``h`` the first 16 hex digits of the
   SHA-256 of the normalized (scrubbed) prompt. Every anonymous prompt then forms its own one-prompt user,
   which the split can place anywhere; the id depends only on the text, so it is stable across re-orderings
   of the file, and identical anonymous prompts (removed in step 3 anyway) share one id.
3. **Deduplicate**. Text is normalized by case folding and collapsing every whitespace run to one space.
   *Exact* duplicates (equal normalized text) are removed first, then *shared-prefix* near-duplicates: the
   paper "heuristically deduplicate[s] prompts by checking for prompts that share a long common prefix";
   here two prompts are near-duplicates when their first ``dedup_prefix_chars`` normalized characters are
   equal and both are at least that long (a shorter prompt only takes part in exact deduplication). The
   default of 64 characters is about a dozen words: long enough that independent prompts rarely share it,
   short enough to catch a template re-sent with a different tail. In both cases the prompt that comes
   first in the input file is kept. Deduplication is global, across users, and sees scrubbed text, so
   prompts that differ only in their PII (a template sent with different e-mail addresses) are duplicates.
4. **Cap per user**: a user with more than ``max_prompts_per_user`` prompts (the paper: 200) keeps a
   uniformly random subset of that size, drawn from ``random.Random(f"{seed}:cap:{user_id}")`` so one
   user's choice does not depend on anyone else's prompts.
5. **Split by user id** into train / valid / test, so no user's prompts straddle two splits. Users are
   shuffled with ``random.Random(f"{seed}:split")`` and taken one at a time; each goes to the split where
   adding its n_u prompts increases the total miss ``Σ_s |N_s − f_s·N|`` least (ties: the split furthest
   below its target, then train < valid < test). The achieved prompt fractions are reported; with few
   users they can miss the targets ``f_s`` by up to one user's prompts.
6. **Tag** each prompt ``type``: ``"few-shot"`` when it holds worked examples, else ``"plain"``
   (:func:`prompt_type` documents the heuristic).
7. **Write** ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (records ``prompt``, ``user_id``, ``type``,
   then the source record's other fields; within a split, prompts keep input order), ``report.json`` and
   ``config.yaml``. Everything is computed before the first write; files are staged in a temporary
   directory inside ``output_dir`` and renamed into place, ``report.json`` last. A failure at any step
   therefore leaves earlier outputs as they were, and no partially written file is ever visible.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from instructrl.config import dump_config, require, require_fraction
from instructrl.data import pii
from instructrl.data.loading import LoadStats, load_prompts
from instructrl.data.records import PromptRecord
from instructrl.utils.io import atomic_write_text, jsonl_line

SPLITS = ("train", "valid", "test")
PROMPT_TYPES = ("plain", "few-shot")
OUTPUT_FILES = tuple(f"{split}.jsonl" for split in SPLITS) + ("config.yaml", "report.json")
"""Files written to ``output_dir``, in the order they are moved into place (``report.json`` last)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of ``instructrl data prepare``."""

    input: str
    """Prompt file (.jsonl or .jsonl.gz, one {"prompt", "user_id"?, ...} object per line) or a saved HF dataset."""
    output_dir: str = "data/prepared"
    """Folder for train.jsonl, valid.jsonl, test.jsonl, report.json and config.yaml (created if missing)."""
    seed: int = 0
    """Seed for the per-user cap and the user split; the same input and seed give byte-identical outputs."""
    skip_bad: bool = False
    """Skip and count malformed input records instead of stopping at the first one."""
    scrub_pii: bool = True
    """Replace e-mail addresses, phone numbers, card numbers and IP addresses with [EMAIL], [PHONE], [CARD], [IP]."""
    dedup_prefix_chars: int = 64
    """Prompts whose first this-many normalized characters (case-folded, whitespace collapsed) are equal count as
    near-duplicates and only the first is kept; 0 turns near-duplicate removal off (exact duplicates are always
    removed)."""
    max_prompts_per_user: int = 200
    """At most this many prompts are kept per user id (InstructGPT: 200); the kept ones are drawn with the seed."""
    valid_fraction: float = 0.1
    """Target fraction of prompts in the validation split (whole users are assigned, so the result is close)."""
    test_fraction: float = 0.1
    """Target fraction of prompts in the test split; the train split gets the rest."""

    def validate(self) -> None:
        require(bool(self.input), "input", "must name a prompt file")
        require(Path(self.input).exists(), "input", f"path does not exist: {self.input}")
        require(bool(self.output_dir), "output_dir", "must name a folder")
        require(not Path(self.output_dir).is_file(), "output_dir", f"is an existing file: {self.output_dir}")
        outputs = {(Path(self.output_dir) / name).resolve() for name in OUTPUT_FILES}
        require(Path(self.input).resolve() not in outputs, "input", "would be overwritten by the outputs")
        require(self.dedup_prefix_chars >= 0, "dedup_prefix_chars", f"must be >= 0, got {self.dedup_prefix_chars}")
        require(
            self.max_prompts_per_user >= 1,
            "max_prompts_per_user",
            f"must be >= 1, got {self.max_prompts_per_user}",
        )
        require_fraction(self, "valid_fraction", "test_fraction", inclusive_high=False)
        total = self.valid_fraction + self.test_fraction
        require(
            total < 1,
            "valid_fraction",
            f"valid_fraction + test_fraction must be < 1 so the train split is not empty, got {total}",
        )

    def split_fractions(self) -> dict[str, float]:
        """Target prompt fraction f_s of each split; train gets ``1 − valid − test``."""
        return {
            "train": 1.0 - self.valid_fraction - self.test_fraction,
            "valid": self.valid_fraction,
            "test": self.test_fraction,
        }


# --------------------------------------------------------------------------- user ids


def normalize(text: str) -> str:
    """Case-folded text with every whitespace run collapsed to one space and the ends stripped."""
    return " ".join(text.casefold().split())


def anonymous_user_id(prompt: str) -> str:
    """``anon-`` plus the first 16 hex digits of SHA-256 of the normalized prompt (stable across runs)."""
    return "anon-" + hashlib.sha256(normalize(prompt).encode("utf-8")).hexdigest()[:16]


def has_user_id(record: PromptRecord) -> bool:
    return record.user_id is not None and record.user_id.strip() != ""


def assign_anonymous_users(records: Iterable[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """Give each prompt without a (non-blank) user id its own :func:`anonymous_user_id`; returns (records, count)."""
    out = []
    n_anonymous = 0
    for record in records:
        if not has_user_id(record):
            record = dataclasses.replace(record, user_id=anonymous_user_id(record.prompt))
            n_anonymous += 1
        out.append(record)
    return out, n_anonymous


# --------------------------------------------------------------------------- PII


def scrub_records(records: Iterable[PromptRecord]) -> tuple[list[PromptRecord], collections.Counter[str], int]:
    """Scrub each prompt; returns (records, replacements per kind, number of prompts changed)."""
    out = []
    counts: collections.Counter[str] = collections.Counter()
    n_changed = 0
    for record in records:
        text, found = pii.scrub(record.prompt)
        if found:
            counts.update(found)
            n_changed += 1
            record = dataclasses.replace(record, prompt=text)
        out.append(record)
    return out, counts, n_changed


# --------------------------------------------------------------------------- deduplication


def remove_exact_duplicates(records: Sequence[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """Keep the first prompt of every normalized text; returns (kept, number removed)."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = normalize(record.prompt)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def remove_prefix_duplicates(records: Sequence[PromptRecord], prefix_chars: int) -> tuple[list[PromptRecord], int]:
    """Keep the first of the prompts sharing their first ``prefix_chars`` normalized characters.

    Prompts shorter than ``prefix_chars`` (normalized) never match here; ``prefix_chars = 0`` keeps all.
    """
    if prefix_chars == 0:
        return list(records), 0
    seen: set[str] = set()
    kept = []
    for record in records:
        text = normalize(record.prompt)
        if len(text) < prefix_chars:
            kept.append(record)
            continue
        key = text[:prefix_chars]
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


# --------------------------------------------------------------------------- per-user cap and split


def group_by_user(records: Iterable[PromptRecord]) -> dict[str, list[int]]:
    """User id -> positions of that user's prompts in ``records`` (users in order of first appearance)."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(str(record.user_id), []).append(i)
    return groups


def cap_per_user(records: Sequence[PromptRecord], cap: int, seed: int) -> tuple[list[PromptRecord], int, int]:
    """Keep at most ``cap`` prompts per user, a seeded uniform sample; returns (kept, n removed, n users capped).

    Kept prompts stay in input order.
    """
    keep = [True] * len(records)
    n_users_capped = 0
    for user_id, positions in group_by_user(records).items():
        if len(positions) <= cap:
            continue
        n_users_capped += 1
        rng = random.Random(f"{seed}:cap:{user_id}")
        chosen = set(rng.sample(positions, cap))
        for position in positions:
            keep[position] = position in chosen
    kept = [r for r, k in zip(records, keep) if k]
    return kept, len(records) - len(kept), n_users_capped


def assign_users_to_splits(user_sizes: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each user id to a split so that split prompt counts N_s approach f_s · N.

    Users are visited in a seeded shuffle of their sorted ids. User u (n_u prompts) goes to the split s
    minimising the change in total miss, ``|N_s + n_u − f_s·N| − |N_s − f_s·N|``; ties go to the split
    with the largest deficit ``f_s·N − N_s``, then to the first in ``SPLITS``. Splits with f_s = 0 get no user.
    """
    total = sum(user_sizes.values())
    targets = {s: fractions[s] * total for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    open_splits = [s for s in SPLITS if fractions[s] > 0]
    users = sorted(user_sizes)
    random.Random(f"{seed}:split").shuffle(users)
    assignment = {}
    for user in users:
        n = user_sizes[user]

        def cost(split: str, n: int = n) -> tuple[float, float, int]:
            miss_increase = abs(counts[split] + n - targets[split]) - abs(counts[split] - targets[split])
            return miss_increase, -(targets[split] - counts[split]), SPLITS.index(split)

        best = min(open_splits, key=cost)
        assignment[user] = best
        counts[best] += n
    return assignment


def split_by_user(
    records: Sequence[PromptRecord], fractions: dict[str, float], seed: int
) -> dict[str, list[PromptRecord]]:
    """Split ``records`` into train / valid / test by user id (see :func:`assign_users_to_splits`)."""
    sizes = {user: len(positions) for user, positions in group_by_user(records).items()}
    assignment = assign_users_to_splits(sizes, fractions, seed)
    splits: dict[str, list[PromptRecord]] = {s: [] for s in SPLITS}
    for record in records:
        splits[assignment[str(record.user_id)]].append(record)
    return splits


# --------------------------------------------------------------------------- few-shot tagging

# "Label:" at the start of a line, 1-3 words, the first capitalised ("Q:", "Input:", "English text:").
_LINE_LABEL = re.compile(r"^[ \t]*([A-Z][\w'-]*(?:[ \t][A-Za-z][\w'-]*){0,2})[ \t]*:(?=\s|$)", re.MULTILINE)
# A one-word capitalised "Label:" after whitespace inside a line ("Q: What is 2+2? A: 4 Q: ...").
_INLINE_LABEL = re.compile(r"(?<=[^\S\n])([A-Z][A-Za-z]{0,19}):(?=\s|$)")
# "input => output" lines (GPT-3 paper style "sea otter => loutre de mer"); no brackets, braces, semicolons
# or "=" elsewhere on the line, so that code ("def f(x) -> int:", "x => x + 1;") does not count.
_ARROW_LINE = re.compile(
    r"^[ \t]*[^\s(){}\[\];=<>-][^(){}\[\];=<>\n]*?[ \t](?:=>|->|→)(?:[ \t][^(){}\[\];=\n]*)?$", re.M
)
_NUMBERED_EXAMPLE = re.compile(r"\bexample[ \t]*(?:#|no\.?)?[ \t]*(\d+)\b", re.IGNORECASE)
_SPEAKER_LABELS = frozenset({"user", "assistant", "human", "ai", "system", "bot", "chatbot", "customer", "agent"})
"""Dialogue speaker labels: repeated turns of a conversation are not worked examples."""


def _labels_in_order(text: str) -> list[str]:
    found: dict[int, str] = {}  # colon position -> label, so a label seen by both patterns counts once
    for pattern in (_LINE_LABEL, _INLINE_LABEL):
        for m in pattern.finditer(text):
            found.setdefault(m.end(), " ".join(m.group(1).casefold().split()))
    return [found[pos] for pos in sorted(found)]


def prompt_type(text: str) -> str:
    """``"few-shot"`` if ``text`` shows worked examples, else ``"plain"``.

    A prompt is few-shot when any of these holds:

    * some pair of different labels occurs as consecutive labels at least twice, e.g. ``Q:`` then ``A:``,
      ``Input:`` / ``Output:``, ``English:`` / ``French:``. A label is a capitalised word (or up to three
      words at the start of a line) followed by a colon. Speaker labels of a dialogue (``User``,
      ``Assistant``, ``Human``, ``AI``, ...) are ignored: earlier turns of a conversation are context, not
      demonstrations. A worked pair followed by an open one (``Q: .. A: .. Q: .. A:``) counts, as in
      GPT-3's one-shot and few-shot prompts;
    * at least two lines of the form ``input => output`` (also ``->``, ``→``), code-like lines excluded;
    * at least two distinct numbered examples (``Example 1`` ... ``Example 2``, ``Example #3``).
    """
    labels = [label for label in _labels_in_order(text) if label not in _SPEAKER_LABELS]
    bigrams = collections.Counter((a, b) for a, b in zip(labels, labels[1:]) if a != b)
    if bigrams and max(bigrams.values()) >= 2:
        return "few-shot"
    if len(_ARROW_LINE.findall(text)) >= 2:
        return "few-shot"
    if len({int(n) for n in _NUMBERED_EXAMPLE.findall(text)}) >= 2:
        return "few-shot"
    return "plain"


# --------------------------------------------------------------------------- outputs


def output_record(record: PromptRecord, kind: str) -> dict[str, Any]:
    """``prompt``, ``user_id``, ``type``, then the source record's other fields (ours win a name clash)."""
    out: dict[str, Any] = {"prompt": record.prompt, "user_id": record.user_id, "type": kind}
    for key, value in record.meta.items():
        out.setdefault(key, value)
    return out


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(jsonl_line(r) for r in records)


def _default_file_mode() -> int:
    """The permission bits ``open()`` would give a new file: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_outputs_atomically(output_dir: Path, files: dict[str, str]) -> None:
    """Stage ``files`` (name -> text) in a temporary folder inside ``output_dir``, then rename each into place.

    Staging files are fsynced before the first rename, so an error while writing (full disk, permissions)
    leaves every earlier output untouched; only the renames touch existing files, in ``files`` order.
    Other files in ``output_dir`` are never touched.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-staging-", dir=output_dir))
    try:
        mode = _default_file_mode()
        for name, text in files.items():
            atomic_write_text(staging / name, text)
            # mkstemp creates 0600 files; outputs are data for other tools and users, so honour the umask.
            os.chmod(staging / name, mode)
        for name in files:
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run`'s report."""
    removed = report["removed"]
    lines = [
        f"prepared {report['prompts_kept']} prompts from {report['input']} -> {report['output_dir']}",
        f"  loaded {report['loaded']['records']} records ({report['loaded']['anonymous']} without user id), "
        f"skipped {removed['bad_records']} bad records",
        f"  removed {removed['exact_duplicates']} exact duplicates, {removed['prefix_duplicates']} shared-prefix "
        f"duplicates, {removed['user_cap']} over the cap of {report['max_prompts_per_user']} per user "
        f"({report['users_capped']} users capped)",
    ]
    if report["pii"]["enabled"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in report["pii"]["by_kind"].items())
        lines.append(f"  PII replaced in {report['pii']['prompts_changed']} prompts: {kinds}")
    else:
        lines.append("  PII scrubbing off")
    lines.append("  split   users  prompts  fraction (target)  few-shot")
    for split, info in report["splits"].items():
        lines.append(
            f"  {split:<6} {info['users']:>6} {info['prompts']:>8}  {info['fraction']:>8.3f} "
            f"({info['target_fraction']:.3f})  {info['types']['few-shot']:>8}"
        )
    lines.extend(f"  warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
    """The result of :func:`prepare_prompts`: records per split, their types, and the report."""

    splits: dict[str, list[PromptRecord]]
    """Split name -> kept records in input order (user ids filled in, PII scrubbed)."""
    types: dict[str, list[str]]
    """Split name -> :func:`prompt_type` of each record, aligned with ``splits``."""
    report: dict[str, Any]
    """Counts of every step (see :func:`run`)."""

    def output_files(self, cfg: Config) -> dict[str, str]:
        """File name -> text of every output file, in the order they are moved into place."""
        files = {
            f"{split}.jsonl": jsonl_text(output_record(r, t) for r, t in zip(self.splits[split], self.types[split]))
            for split in SPLITS
        }
        files["config.yaml"] = dump_config(cfg)
        files["report.json"] = json.dumps(self.report, indent=2, ensure_ascii=False) + "\n"
        return files


def prepare_prompts(records: Sequence[PromptRecord], cfg: Config, stats: LoadStats | None = None) -> PreparedPrompts:
    """Steps 2-6 of the module docstring on loaded ``records``, in memory; ``stats`` is the load's statistics."""
    stats = stats if stats is not None else LoadStats(n_ok=len(records))
    n_loaded = len(records)
    pii_counts: collections.Counter[str] = collections.Counter()
    n_pii_prompts = 0
    if cfg.scrub_pii:
        records, pii_counts, n_pii_prompts = scrub_records(records)
    records, n_anonymous = assign_anonymous_users(records)

    records, n_exact = remove_exact_duplicates(records)
    records, n_prefix = remove_prefix_duplicates(records, cfg.dedup_prefix_chars)
    records, n_capped, n_users_capped = cap_per_user(records, cfg.max_prompts_per_user, cfg.seed)

    fractions = cfg.split_fractions()
    splits = split_by_user(records, fractions, cfg.seed)
    types = {split: [prompt_type(r.prompt) for r in split_records] for split, split_records in splits.items()}

    n_kept = len(records)
    split_report = {}
    warnings = []
    for split in SPLITS:
        split_records = splits[split]
        type_counts = collections.Counter(types[split])
        split_report[split] = {
            "users": len({r.user_id for r in split_records}),
            "prompts": len(split_records),
            "fraction": len(split_records) / n_kept if n_kept else 0.0,
            "target_fraction": fractions[split],
            "types": {t: type_counts[t] for t in PROMPT_TYPES},
        }
        if fractions[split] > 0 and not split_records:
            warnings.append(f"the {split} split is empty: too few users for the requested fractions")
    all_types = collections.Counter(t for split in SPLITS for t in types[split])
    report: dict[str, Any] = {
        "input": str(cfg.input),
        "output_dir": str(cfg.output_dir),
        "seed": cfg.seed,
        "loaded": {"records": n_loaded, "anonymous": n_anonymous},
        "bad_records": {
            "skipped": stats.n_skipped,
            "reasons": dict(sorted(stats.reasons.items())),
            "examples": list(stats.examples),
        },
        "pii": {
            "enabled": cfg.scrub_pii,
            "prompts_changed": n_pii_prompts,
            "by_kind": {kind: pii_counts[kind] for kind in pii.KINDS},
        },
        "removed": {
            "bad_records": stats.n_skipped,
            "exact_duplicates": n_exact,
            "prefix_duplicates": n_prefix,
            "user_cap": n_capped,
        },
        "dedup_prefix_chars": cfg.dedup_prefix_chars,
        "max_prompts_per_user": cfg.max_prompts_per_user,
        "users_capped": n_users_capped,
        "prompts_kept": n_kept,
        "users_kept": sum(info["users"] for info in split_report.values()),
        "splits": split_report,
        "types": {t: all_types[t] for t in PROMPT_TYPES},
        "warnings": warnings,
    }
    return PreparedPrompts(splits, types, report)


def run(cfg: Config) -> dict[str, Any]:
    """Load, prepare and write (module docstring); returns the report, also written to ``report.json``.

    Report keys: ``loaded`` (records, anonymous), ``bad_records`` (skipped, reasons, examples), ``pii``
    (enabled, prompts_changed, by_kind), ``removed`` (bad_records, exact_duplicates, prefix_duplicates,
    user_cap), ``users_capped``, ``prompts_kept``, ``users_kept``, ``splits`` (per split: users, prompts,
    fraction, target_fraction, types), ``types`` and ``warnings``, plus the settings that shaped them.
    """
    records, stats = load_prompts(cfg.input, skip_bad=cfg.skip_bad)
    prepared = prepare_prompts(records, cfg, stats)
    write_outputs_atomically(Path(cfg.output_dir), prepared.output_files(cfg))
    print(format_report(prepared.report), flush=True)
    return prepared.report
