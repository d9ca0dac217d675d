"""Streaming loaders for demonstrations, comparisons, prompts and pretraining texts.

Sources
    * ``*.jsonl`` and ``*.jsonl.gz``: one JSON object per line, read line by line (files may be large).
      Blank lines are skipped. A UTF-8 byte-order mark on the first line is ignored.
    * a directory written by Hugging Face ``datasets.Dataset.save_to_disk`` (needs ``pip install datasets``);
      for these, the "line" in error messages is the 1-based row number.

Record formats (fields not listed are kept in the record's ``meta``)
    * demonstration: ``{"prompt", "response"}`` or chat ``{"messages": [{"role", "content"}, ...]}``, roles
      ``system`` / ``user`` / ``assistant``; the last message must be a non-empty assistant turn, the others
      form the prompt.
    * comparison, detected per record:
        - K-way ``{"prompt", "responses": [...], "ranking": [...]}``: 2 <= K <= ``max_k``; ranking lists
          response indices best first, a nested list is a tie group; flattened it is a permutation of range(K).
          A response may be empty (a policy sample that ended at once) and may repeat another one; the reward
          model merges identical texts (``Comparison.distinct_pairs``).
        - pairwise ``{"prompt", "chosen", "rejected"}``: K = 2, ranking (0, 1) (index 0 is ``chosen``); either
          response may be empty.
        - Anthropic HH-RLHF ``{"chosen", "rejected"}`` whole transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``:
          each is split at its last ``"\\n\\nAssistant:"``; the prompt is the dialogue up to and including that
          marker and must be identical in both; the responses are the two final replies, leading whitespace removed.
    * prompt: ``{"prompt", "user_id"?}``, ``user_id`` a string or an integer (stored as a string).
    * text: ``{"text"}``.

Errors
    A bad record raises :class:`~instructrl.errors.DataError` naming the file, the 1-based line and the
    field. With ``skip_bad=True`` bad records are skipped instead and counted by reason in :class:`LoadStats`.
    Problems with the file itself (missing, unsupported type, corrupt gzip stream) always raise.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from instructrl.data.records import Comparison, Demonstration, PromptRecord, RankingElement, TextRecord
from instructrl.errors import DataError

RecordKind = Literal["demonstration", "comparison", "prompt", "text"]
Record = Demonstration | Comparison | PromptRecord | TextRecord

CHAT_ROLES = ("system", "user", "assistant")
HH_ASSISTANT_MARKER = "\n\nAssistant:"
DEFAULT_MAX_K = 9
"""InstructGPT showed labelers K = 4 to 9 responses per prompt (Ouyang et al. 2022, §3.5)."""


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class LoadStats:
    """Counts of a load: records kept, records skipped (only with ``skip_bad=True``) and why."""

    n_ok: int = 0
    """Records loaded."""
    n_skipped: int = 0
    """Bad records skipped."""
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Skip reason code (e.g. ``empty_field``, ``invalid_json``) -> number of records skipped for it."""
    examples: list[str] = dataclasses.field(default_factory=list)
    """The full error messages of the first ``MAX_EXAMPLES`` skipped records (file, line, field), for the log."""

    MAX_EXAMPLES = 5

    def summary(self) -> str:
        """One line, e.g. ``loaded 2303 records, skipped 9 (hh_prompt_mismatch: 5, empty_field: 4)``."""
        text = f"loaded {self.n_ok} records, skipped {self.n_skipped}"
        if self.reasons:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common()) + ")"
        return text

    def _count_skip(self, reason: str, error: DataError) -> None:
        self.n_skipped += 1
        self.reasons[reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(error))


class _BadRecord(Exception):
    """A record-level problem, raised by the parsers before the file and line are known."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


# --------------------------------------------------------------------------- field helpers


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(obj: Mapping[str, Any], field: str) -> Any:
    if field not in obj:
        raise _BadRecord("missing_field", f"missing (record has keys {sorted(obj)})", field)
    return obj[field]


def _require_str(obj: Mapping[str, Any], field: str, *, non_empty: bool = True) -> str:
    return _check_str(_require(obj, field), field, non_empty=non_empty)


def _check_str(value: Any, field: str, *, non_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _BadRecord("wrong_type", f"expected a string, got {_type_name(value)}", field)
    if non_empty and not value.strip():
        raise _BadRecord("empty_field", "is empty or whitespace only", field)
    return value


def _extra_fields(obj: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    known = set(known)
    return {key: value for key, value in obj.items() if key not in known}


# --------------------------------------------------------------------------- chat


def render_chat_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Any = None) -> str:
    """Render chat ``messages`` as the prompt text a model continues with the assistant's reply.

    With a tokenizer that has a ``chat_template``:
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.

    Otherwise a plain fallback: one ``"<Role>: <content>"`` line per message (role capitalised), then
    ``"Assistant:"`` on its own line, with no trailing space so a response is appended as ``" " + response``::

        System: Be brief.
        User: Hi
        Assistant:
    """
    messages = [dict(m) for m in messages]
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs string 'role' and 'content', got {message!r}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


def model_prompt(prompt: str, tokenizer: Any = None, messages: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The text a model is given for a prompt: one rule for every stage (SFT, the reward model and its bias, PPO,
    evaluation and generation).

    With a tokenizer that has a ``chat_template`` every prompt goes through the template: a chat record's
    ``messages``, a plain prompt as one user message. Otherwise the text as it is (a chat record's ``prompt``
    already holds its plain rendering, :func:`render_chat_prompt`). One rule keeps the reward model's bias,
    fitted on demonstrations, on the format of the comparisons and of the PPO prompts whose rewards it shifts.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        turns = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
        return render_chat_prompt(turns, tokenizer)
    return prompt


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], messages: Sequence[Sequence[Mapping[str, Any]] | None] | None = None
) -> list[list[int]]:
    """Token ids of each prompt as :func:`model_prompt` renders it (``messages[i]``: the chat turns of prompt i,
    or None), without added special tokens: responses and EOS are appended after them."""
    turns = messages if messages is not None else [None] * len(prompts)
    texts = [model_prompt(prompt, tokenizer, chat) for prompt, chat in zip(prompts, turns)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _BadRecord("wrong_type", f"expected a list of messages, got {_type_name(value)}", "messages")
    if not value:
        raise _BadRecord("empty_field", "is an empty list", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _BadRecord("wrong_type", f"expected an object, got {_type_name(message)}", where)
        if "role" not in message:
            raise _BadRecord("missing_field", "missing", f"{where}.role")
        role = _check_str(message["role"], f"{where}.role")
        if role not in CHAT_ROLES:
            raise _BadRecord("bad_role", f"unknown role {role!r}; expected one of {list(CHAT_ROLES)}", f"{where}.role")
        if "content" not in message:
            raise _BadRecord("missing_field", "missing", f"{where}.content")
        _check_str(message["content"], f"{where}.content", non_empty=False)
        messages.append(dict(message))
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _BadRecord(
            "chat_last_not_assistant",
            f"the last message must be the assistant's reply, got role {messages[last]['role']!r}",
            f"messages[{last}].role",
        )
    _check_str(messages[last]["content"], f"messages[{last}].content")
    if not any(m["content"].strip() for m in messages[:last]):
        raise _BadRecord("empty_field", "no non-empty message before the final assistant reply", "messages")
    return messages


# --------------------------------------------------------------------------- record parsers


def _parse_demonstration(obj: dict[str, Any], max_k: int) -> Demonstration:
    if "messages" in obj:
        messages = _parse_messages(obj["messages"])
        prompt_messages = tuple(messages[:-1])
        return Demonstration(
            prompt=render_chat_prompt(prompt_messages),
            response=messages[-1]["content"],
            prompt_messages=prompt_messages,
            meta=_extra_fields(obj, ["messages"]),
        )
    if "prompt" not in obj and "response" not in obj:
        raise _BadRecord(
            "missing_field",
            f"missing: a demonstration needs 'prompt' and 'response', or 'messages' (record has keys {sorted(obj)})",
            "prompt",
        )
    return Demonstration(
        prompt=_require_str(obj, "prompt"),
        response=_require_str(obj, "response"),
        meta=_extra_fields(obj, ["prompt", "response"]),
    )


def _parse_ranking(value: Any, k: int) -> tuple[RankingElement, ...]:
    """Check a JSON ranking against K responses; return it with tie groups as tuples."""
    if not isinstance(value, list):
        raise _BadRecord("wrong_type", f"expected a list of response indices, got {_type_name(value)}", "ranking")

    def index(item: Any, where: str) -> int:
        if isinstance(item, bool) or not isinstance(item, int):
            raise _BadRecord("wrong_type", f"{where}: expected a response index (int), got {item!r}", "ranking")
        if not 0 <= item < k:
            raise _BadRecord("bad_ranking", f"{where}: index {item} is out of range for {k} responses", "ranking")
        return item

    ranking: list[RankingElement] = []
    for i, element in enumerate(value):
        if isinstance(element, list):
            if not element:
                raise _BadRecord("bad_ranking", f"element {i} is an empty tie group", "ranking")
            ranking.append(tuple(index(item, f"element {i}") for item in element))
        else:
            ranking.append(index(element, f"element {i}"))
    flat = [i for e in ranking for i in (e if isinstance(e, tuple) else (e,))]
    duplicates = sorted({i for i in flat if flat.count(i) > 1})
    missing = sorted(set(range(k)) - set(flat))
    if duplicates or missing:
        problems = []
        if duplicates:
            problems.append(f"indices {duplicates} appear more than once")
        if missing:
            problems.append(f"indices {missing} are missing")
        raise _BadRecord(
            "bad_ranking", f"is not a permutation of range({k}): {'; '.join(problems)} (got {value!r})", "ranking"
        )
    return tuple(ranking)


def _split_hh_transcript(transcript: str, field: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript at its last ``"\\n\\nAssistant:"`` into (prompt incl. marker, reply)."""
    cut = transcript.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        raise _BadRecord("hh_no_assistant_turn", f"transcript has no {HH_ASSISTANT_MARKER!r} turn", field)
    cut += len(HH_ASSISTANT_MARKER)
    prompt, reply = transcript[:cut], transcript[cut:].lstrip()
    if not prompt[: -len(HH_ASSISTANT_MARKER)].strip():
        raise _BadRecord("empty_field", "transcript has no dialogue before the final Assistant turn", field)
    if not reply.strip():
        raise _BadRecord("empty_field", "the final Assistant reply is empty", field)
    return prompt, reply


def _split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (shared prompt, chosen reply, rejected reply).

    The prompt is the dialogue up to and including the last ``"\n\nAssistant:"`` marker that both
    transcripts share (inside their common prefix). For well-formed records that is each transcript's final
    marker; a few published records glue a later "Human:" turn into a reply without the "\n\n" separator,
    and for those the shared-prefix rule still finds the true common dialogue, with the glued text kept
    in the reply where the data put it.
    """
    _split_hh_transcript(chosen, "chosen")  # each transcript must itself be well-formed
    _split_hh_transcript(rejected, "rejected")
    common = _first_difference(chosen, rejected)
    cut = chosen.rfind(HH_ASSISTANT_MARKER, 0, common)  # the marker must lie wholly in the shared prefix
    if cut < 0:
        raise _BadRecord(
            "hh_prompt_mismatch",
            f"'chosen' and 'rejected' share no dialogue up to an {HH_ASSISTANT_MARKER!r} turn "
            f"(first difference at character {common}); the two transcripts must share every turn but the last reply",
            "rejected",
        )
    cut += len(HH_ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:].lstrip(), rejected[cut:].lstrip()


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _parse_comparison(obj: dict[str, Any], max_k: int) -> Comparison:
    if "responses" in obj:  # K-way ranking
        prompt = _require_str(obj, "prompt")
        responses = _require(obj, "responses")
        if not isinstance(responses, list):
            raise _BadRecord("wrong_type", f"expected a list of strings, got {_type_name(responses)}", "responses")
        if not 2 <= len(responses) <= max_k:
            raise _BadRecord("k_out_of_range", f"has {len(responses)} responses; need 2 <= K <= {max_k}", "responses")
        # An empty response is a real policy output (a sample that ended at once), which labelers rank.
        responses = [_check_str(r, f"responses[{i}]", non_empty=False) for i, r in enumerate(responses)]
        ranking = _parse_ranking(_require(obj, "ranking"), len(responses))
        return Comparison(prompt, tuple(responses), ranking, _extra_fields(obj, ["prompt", "responses", "ranking"]))
    if "prompt" in obj:  # pairwise
        if "chosen" not in obj and "rejected" not in obj:
            raise _unknown_comparison_format(obj)
        prompt = _require_str(obj, "prompt")
        chosen = _require_str(obj, "chosen", non_empty=False)
        rejected = _require_str(obj, "rejected", non_empty=False)
        return Comparison(prompt, (chosen, rejected), (0, 1), _extra_fields(obj, ["prompt", "chosen", "rejected"]))
    if "chosen" in obj and "rejected" in obj:  # Anthropic HH-RLHF transcripts
        chosen_text, rejected_text = _require_str(obj, "chosen"), _require_str(obj, "rejected")
        prompt, chosen, rejected = _split_hh_pair(chosen_text, rejected_text)
        return Comparison(prompt, (chosen, rejected), (0, 1), _extra_fields(obj, ["chosen", "rejected"]))
    raise _unknown_comparison_format(obj)


def _unknown_comparison_format(obj: dict[str, Any]) -> _BadRecord:
    return _BadRecord(
        "unknown_format",
        "unrecognized comparison format: expected {prompt, responses, ranking}, {prompt, chosen, rejected} "
        f"or HH-RLHF {{chosen, rejected}}; record has keys {sorted(obj)}",
    )


def _parse_prompt(obj: dict[str, Any], max_k: int) -> PromptRecord:
    prompt = _require_str(obj, "prompt")
    user_id = obj.get("user_id")
    if user_id is not None:
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise _BadRecord("wrong_type", f"expected a string or an integer, got {_type_name(user_id)}", "user_id")
        user_id = str(user_id)
    return PromptRecord(prompt, user_id, _extra_fields(obj, ["prompt", "user_id"]))


def _parse_text(obj: dict[str, Any], max_k: int) -> TextRecord:
    return TextRecord(_require_str(obj, "text"))


_PARSERS = {
    "demonstration": _parse_demonstration,
    "comparison": _parse_comparison,
    "prompt": _parse_prompt,
    "text": _parse_text,
}


# --------------------------------------------------------------------------- sources


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRecord]]:
    """Yield ``(line_number, object_or_problem)`` for every non-blank line, reading one line at a time.

    Lines are read as bytes and decoded one by one so that invalid UTF-8 is reported on its own line.
    """
    is_gzip = path.name.lower().endswith(".gz")
    line_number = 0
    try:
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield line_number, _BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
                    continue
                if line_number == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    yield line_number, _BadRecord("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
                    continue
                except (ValueError, RecursionError) as e:  # an integer over Python's digit limit; nesting too deep
                    yield line_number, _BadRecord("invalid_json", f"unreadable JSON: {str(e)[:200]}")
                    continue
                if not isinstance(obj, dict):
                    yield line_number, _BadRecord("not_object", f"expected a JSON object, got {_type_name(obj)}")
                    continue
                if _SURROGATE_ESCAPE.search(text) and (where := _field_with_lone_surrogate(obj)) is not None:
                    yield (
                        line_number,
                        _BadRecord(
                            "invalid_unicode",
                            "holds an unpaired UTF-16 surrogate escape (not valid Unicode text)",
                            where,
                        ),
                    )
                    continue
                yield line_number, obj
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corrupt or truncated gzip stream ({e})", path=str(path), line=line_number + 1) from e


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: the only way a line that decoded as UTF-8 can yield a lone surrogate."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _field_with_lone_surrogate(obj: dict[str, Any]) -> str | None:
    """The path of the first key or string value holding a lone surrogate (which no UTF-8 writer accepts)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return where or "record"
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{where}.{key}" if where else key
                if _LONE_SURROGATE.search(key):
                    return child.encode("utf-8", "backslashreplace").decode("ascii")
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def _dataset_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRecord]]:
    """Open a directory written by ``datasets.Dataset.save_to_disk``; the iterator yields ``(row_number, row)``.

    Not a generator itself, so that a missing ``datasets`` package or an unreadable directory fail at once.
    """
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "is a directory; reading a Hugging Face dataset saved with save_to_disk needs the 'datasets' "
            "package: pip install datasets",
            path=str(path),
        ) from e
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types here; all mean "not a saved dataset"
        raise DataError(f"could not be read as a saved Hugging Face dataset: {e}", path=str(path)) from e
    if isinstance(dataset, dict):  # DatasetDict subclasses dict
        raise DataError(
            f"holds several splits {sorted(dataset)}; pass the directory of one split, "
            f"e.g. {path / sorted(dataset)[0]}",
            path=str(path),
        )
    return ((row_number, dict(row)) for row_number, row in enumerate(dataset, start=1))


def _open_source(path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRecord]]:
    if path.is_dir():
        return _dataset_rows(path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    name = path.name.lower()
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise DataError(
            "unsupported file type: expected a .jsonl or .jsonl.gz file, or a directory saved by datasets",
            path=str(path),
        )
    return _jsonl_objects(path)


# --------------------------------------------------------------------------- public loaders


def iter_records(
    path: str | Path,
    kind: RecordKind,
    *,
    skip_bad: bool = False,
    stats: LoadStats | None = None,
    max_k: int = DEFAULT_MAX_K,
) -> Iterator[Record]:
    """Stream the records of ``kind`` from ``path`` (see the module docstring for formats).

    A missing file, an unknown ``kind`` or an unsupported file type raise here, before iteration starts.
    A bad record raises :class:`DataError` (file, line, field) when reached, unless ``skip_bad`` is set;
    then it is skipped and counted in ``stats`` (if given), which is updated as iteration proceeds.
    """
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(_PARSERS)}")
    if max_k < 2:
        raise ValueError(f"max_k must be >= 2, got {max_k}")
    path = Path(path)
    source = _open_source(path)
    return _iter_parsed(path, source, _PARSERS[kind], skip_bad, stats if stats is not None else LoadStats(), max_k)


def _iter_parsed(
    path: Path,
    source: Iterator[tuple[int, dict[str, Any] | _BadRecord]],
    parse: Any,
    skip_bad: bool,
    stats: LoadStats,
    max_k: int,
) -> Iterator[Record]:
    for line_number, item in source:
        try:
            if isinstance(item, _BadRecord):
                raise item
            record = parse(item, max_k)
        except _BadRecord as bad:
            error = DataError(bad.message, path=str(path), line=line_number, field=bad.field)
            if not skip_bad:
                raise error from None
            stats._count_skip(bad.reason, error)
            continue
        stats.n_ok += 1
        yield record


def _load(path: str | Path, kind: RecordKind, skip_bad: bool, max_k: int) -> tuple[list[Any], LoadStats]:
    stats = LoadStats()
    records = list(iter_records(path, kind, skip_bad=skip_bad, stats=stats, max_k=max_k))
    return records, stats


def load_demonstrations(
    path: str | Path, *, skip_bad: bool = False, max_k: int = DEFAULT_MAX_K
) -> tuple[list[Demonstration], LoadStats]:
    """Load all demonstrations from ``path``; see :func:`iter_records`."""
    return _load(path, "demonstration", skip_bad, max_k)


def load_comparisons(
    path: str | Path, *, skip_bad: bool = False, max_k: int = DEFAULT_MAX_K
) -> tuple[list[Comparison], LoadStats]:
    """Load all comparisons (K-way, pairwise or HH-RLHF, detected per record) from ``path``."""
    return _load(path, "comparison", skip_bad, max_k)


def load_prompts(
    path: str | Path, *, skip_bad: bool = False, max_k: int = DEFAULT_MAX_K
) -> tuple[list[PromptRecord], LoadStats]:
    """Load all prompt records from ``path``; see :func:`iter_records`."""
    return _load(path, "prompt", skip_bad, max_k)


def load_texts(
    path: str | Path, *, skip_bad: bool = False, max_k: int = DEFAULT_MAX_K
) -> tuple[list[TextRecord], LoadStats]:
    """Load all pretraining texts from ``path``; see :func:`iter_records`."""
    return _load(path, "text", skip_bad, max_k)
