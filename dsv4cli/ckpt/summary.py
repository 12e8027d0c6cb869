"""How a list of tensor-key problems is said in one error line: counts per category, the first few, how to see all.

    176 problems: 1 missing (1 model), 175 unexpected (175 optimizer); missing: decoder.final_layernorm.weight [32];
    unexpected: chained_0.optimizer.state.exp_avg.decoder.w [32]; ...; 171 more (see all with --verbose)

Categories are missing / unexpected / mis-shaped, each split into model and optimizer state by
`keys.is_optimizer_key` (other kinds, e.g. a damaged file, are counted as "other"); hints such as
the convert-ckpt command of a legacy checkpoint come right after the counts. Used by the
launch-time preflights (`dsv4 eval`, resume), `dsv4 inspect checkpoint`'s conformance and the
load-time tensor check in training and eval.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dsv4cli.ckpt.keys import HC_HEAD_NAMES, is_optimizer_key

KINDS = ("missing", "unexpected", "mis-shaped")
FIRST = 5
SEE_ALL = "--verbose"


@dataclass(frozen=True)
class KeyProblem:
    """One problem with one stored key: kind (missing | unexpected | mis-shaped | ...), key, and its line."""

    kind: str
    key: str
    text: str

    @classmethod
    def of(cls, kind: str, key: str, detail: str = "") -> "KeyProblem":
        return cls(kind, key, f"{kind}: {key} {detail}".rstrip())

    def __str__(self) -> str:
        return self.text


def count_line(problems: Sequence[KeyProblem]) -> str:
    """'2 missing (2 model), 176 unexpected (1 model, 175 optimizer)' (categories in KINDS order, then other)."""
    parts = []
    for kind in KINDS:
        of_kind = [p for p in problems if p.kind == kind]
        if not of_kind:
            continue
        opt = sum(is_optimizer_key(p.key) for p in of_kind)
        split = [f"{n} {what}" for n, what in ((len(of_kind) - opt, "model"), (opt, "optimizer")) if n]
        parts.append(f"{len(of_kind)} {kind} ({', '.join(split)})")
    other = sum(p.kind not in KINDS for p in problems)
    if other:
        parts.append(f"{other} other")
    return ", ".join(parts)


def ordered(problems: Iterable[KeyProblem]) -> list[KeyProblem]:
    """By kind (missing, unexpected, mis-shaped, other), model keys before optimizer keys; stable otherwise."""
    rank = {k: i for i, k in enumerate(KINDS)}
    return sorted(problems, key=lambda p: (rank.get(p.kind, len(KINDS)), is_optimizer_key(p.key)))


def summarize(problems: Sequence[KeyProblem], *, verbose: bool = False, limit: int = FIRST,
              see_all: str = SEE_ALL, hints: Iterable[str] = ()) -> str:
    """One line: '<N> problems: <counts>; <hints>; <first `limit` lines>; <k> more (see all with --verbose)'.

    verbose lists every problem; they are listed in `ordered` order, so the first few say the most.
    """
    ranked = ordered(problems)
    shown = ranked if verbose else ranked[:limit]
    noun = "problem" if len(problems) == 1 else "problems"
    parts = [f"{len(problems)} {noun}: {count_line(problems)}", *(h for h in hints if h), *(p.text for p in shown)]
    if len(shown) < len(ranked):
        parts.append(f"{len(ranked) - len(shown)} more (see all with {see_all})")
    return "; ".join(parts)


def convert_command(src: str | Path) -> str:
    """The command that converts a legacy checkpoint: 'dsv4 convert-ckpt SRC SRC-learned'."""
    return f"dsv4 convert-ckpt {shlex.quote(str(src))} {shlex.quote(str(src).rstrip('/') + '-learned')}"


def legacy_hint(problems: Sequence[KeyProblem], src: str | Path) -> Optional[str]:
    """When model hc_head_* tensors are missing (a legacy averaging-contraction checkpoint): how to convert."""
    missing = [p.key for p in problems if p.kind == "missing" and not is_optimizer_key(p.key)]
    if not any(k.rsplit(".", 1)[-1] in HC_HEAD_NAMES for k in missing):
        return None
    return f"legacy averaging-contraction checkpoint (no hc_head_* tensors); convert it with: {convert_command(src)}"
