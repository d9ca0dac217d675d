"""In-memory record types for every stage's input data.

The loaders in :mod:`instructrl.data.loading` turn file lines into these frozen dataclasses; other
stages (labeling, rollouts) may also build them directly. ``meta`` carries every optional or unknown
field of the source record (``labeler_id``, ``category``, ``id``, ...) so that nothing is lost on a
load / save round trip.

A :class:`Comparison` stores one prompt with K responses and a human ranking of them. InstructGPT
(Ouyang et al. 2022, §3.5) trains the reward model r_θ on *all* C(K, 2) pairs from one ranking,

    loss(θ) = −1/C(K,2) · E_{(x, y_w, y_l)} [ log σ( r_θ(x, y_w) − r_θ(x, y_l) ) ],

so :meth:`Comparison.pairs` yields exactly those (y_w, y_l) index pairs. Labelers may declare ties;
a tied pair carries no preference and is dropped, so with ties ``n_pairs < C(K, 2)``. A response may be
empty (a policy sample that ended at once is a real output that labelers rank), and the same text may
appear more than once (a small policy often repeats itself): :meth:`Comparison.distinct_pairs` merges
identical texts into one completion, which is what the reward model trains on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

RankingElement = int | tuple[int, ...]
"""One entry of a ranking: a response index, or a tuple of indices that are tied."""


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """A prompt with a human-written (or chosen) response, for supervised fine-tuning."""

    prompt: str
    """The prompt text. For chat records: a plain rendering of ``prompt_messages`` (see ``render_chat_prompt``)."""
    response: str
    """The target response (the final assistant turn for chat records)."""
    prompt_messages: tuple[dict[str, Any], ...] | None = dataclasses.field(default=None, hash=False)
    """For chat records: every message before the final assistant turn (``{"role", "content"}`` dicts)."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Extra fields of the source record."""

    @property
    def is_chat(self) -> bool:
        """Whether this record came from a ``messages`` list (so a chat template can re-render the prompt)."""
        return self.prompt_messages is not None


def _flatten_ranking(ranking: tuple[RankingElement, ...]) -> Iterator[int]:
    for element in ranking:
        if isinstance(element, tuple):
            yield from element
        else:
            yield element


def _normalize_ranking(ranking: Any) -> tuple[RankingElement, ...]:
    """Lists become tuples; a tie group of one index becomes that index, so equal rankings compare equal."""
    if not isinstance(ranking, (list, tuple)):
        raise ValueError(f"'ranking' must be a list or tuple of response indices, got {ranking!r}")
    normalized: list[RankingElement] = []
    for element in ranking:
        if isinstance(element, (list, tuple)):
            group = tuple(element)
            normalized.append(group[0] if len(group) == 1 else group)
        else:
            normalized.append(element)
    return tuple(normalized)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One prompt, K >= 2 responses and their ranking (best first; a tuple inside ``ranking`` is a tie group).

    Example: ``responses=("a", "b", "c"), ranking=(2, (0, 1))`` means c is best and a, b are tied below it.
    Construction checks that ``ranking`` flattened is a permutation of ``range(K)`` and raises
    ``ValueError`` otherwise (the file loaders report the same problems as ``DataError`` with a line).
    """

    prompt: str
    """The prompt all responses answer."""
    responses: tuple[str, ...]
    """The K candidate responses."""
    ranking: tuple[RankingElement, ...]
    """Response indices from best to worst; a tuple element is a group of tied responses."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Extra fields of the source record (e.g. ``labeler_id``)."""

    def __post_init__(self) -> None:
        # Accept lists for convenience, but store tuples so the record really is immutable.
        object.__setattr__(self, "responses", tuple(self.responses))
        object.__setattr__(self, "ranking", _normalize_ranking(self.ranking))
        k = len(self.responses)
        if k < 2:
            raise ValueError(f"a comparison needs at least 2 responses, got {k}")
        for element in self.ranking:
            if isinstance(element, tuple) and len(element) == 0:
                raise ValueError("a tie group in 'ranking' is empty")
        flat = list(_flatten_ranking(self.ranking))
        if any(isinstance(i, bool) or not isinstance(i, int) for i in flat):
            raise ValueError(f"'ranking' must hold response indices (ints), got {self.ranking!r}")
        if sorted(flat) != list(range(k)):
            raise ValueError(f"'ranking' {self.ranking!r} is not a permutation of range({k})")

    @property
    def k(self) -> int:
        """Number of responses K."""
        return len(self.responses)

    def ranks(self) -> list[int]:
        """Rank of each response in response order: 0 is best; tied responses share a rank.

        Ranks are dense (the position of the response's group in ``ranking``): ranking ``(2, (0, 1))``
        gives ``[1, 1, 0]``.
        """
        rank_of = [0] * self.k
        for group_rank, element in enumerate(self.ranking):
            for index in element if isinstance(element, tuple) else (element,):
                rank_of[index] = group_rank
        return rank_of

    def pairs(self) -> list[tuple[int, int]]:
        """All ``(winner, loser)`` response-index pairs implied by the ranking, tied pairs dropped.

        Canonical order: sorted by ``(winner, loser)``, so the result does not depend on how the indices
        inside a tie group were written. Length is ``C(K,2) − Σ_groups C(g,2)``.
        """
        rank_of = self.ranks()
        return sorted(
            (i, j) if rank_of[i] < rank_of[j] else (j, i)
            for i in range(self.k)
            for j in range(i + 1, self.k)
            if rank_of[i] != rank_of[j]
        )

    def distinct_pairs(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Identical response texts merged: (the first index of each distinct text, the ``(winner, loser)`` pairs
        between those indices), in the canonical order of :meth:`pairs`.

        Copies of one text are one completion for the reward model; counting each copy's pairs would weight that
        text once per copy and add copy-vs-copy pairs whose margin is 0 by construction. The rule: text u beats
        text v when **every** copy of u is ranked above every copy of v. Copies that share a rank (or a tie group)
        merge without loss; a preference the copies contradict (one copy of u above v, another below) is dropped,
        as a tie is, rather than resolved in favour of either copy. The kept pairs are always consistent (no
        cycles), and without repeated texts they are exactly :meth:`pairs`.
        """
        rank_of = self.ranks()
        ranks_of_text: dict[str, list[int]] = {}
        first_index: dict[str, int] = {}
        for i, text in enumerate(self.responses):
            first_index.setdefault(text, i)
            ranks_of_text.setdefault(text, []).append(rank_of[i])
        bounds = {first_index[t]: (min(r), max(r)) for t, r in ranks_of_text.items()}  # best and worst copy
        pairs = [(u, v) for u in bounds for v in bounds if bounds[u][1] < bounds[v][0]]
        return list(bounds), sorted(pairs)

    @property
    def n_pairs(self) -> int:
        """Number of untied pairs: ``C(K,2) − Σ_groups C(g,2)`` (equals ``C(K,2)`` without ties)."""
        tied = sum(len(e) * (len(e) - 1) // 2 for e in self.ranking if isinstance(e, tuple))
        return self.k * (self.k - 1) // 2 - tied


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt for rollouts / PPO, optionally tagged with the user who wrote it (for per-user splits)."""

    prompt: str
    """The prompt text."""
    user_id: str | None = None
    """Who wrote the prompt; integers in the source file are stored as strings."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Extra fields of the source record (e.g. ``category``)."""


@dataclasses.dataclass(frozen=True)
class TextRecord:
    """A plain pretraining text (the PPO-ptx pretraining-mix term)."""

    text: str
    """The document text."""
