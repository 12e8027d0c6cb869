"""Problems found in a spec: where (file, line, dotted key), what, and how bad (error or warning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

Severity = Literal["error", "warning"]

OVERRIDE_FILE = "--set"
"""`Problem.file` of a value that came from a `--set KEY=VALUE` override."""

Origin = tuple[str, Optional[int]]
"""Where a key was set: (file as shown to the user, 1-based line or None)."""


def origin_of(origins: dict[str, Origin], key: str, root: str) -> Origin:
    """The origin of dotted `key`, or of its nearest parent table that has one; (root, None) if none."""
    parts = key.split(".") if key else []
    while parts:
        origin = origins.get(".".join(parts))
        if origin is not None:
            return origin
        parts.pop()
    return (root, None)


@dataclass(frozen=True)
class Problem:
    """One finding, printed as `FILE:LINE: dotted.key: message` (LINE omitted when unknown)."""

    file: str
    line: Optional[int]
    key: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        message = f"warning: {self.message}" if self.severity == "warning" else self.message
        return f"{where}: {self.key}: {message}" if self.key else f"{where}: {message}"

    def to_json(self) -> dict:
        """{file, line, key, message} (severity is implied by the list the problem is in)."""
        data = asdict(self)
        data.pop("severity")
        return data


class SpecError(Exception):
    """Bad spec input; `.problems` lists every error found (all at once, not the first only)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
