"""Key -> line numbers of a TOML document (tomllib parses values but forgets where they were).

`key_lines(text)` maps every key path the document sets — table headers, dotted keys and
keys inside inline tables — to the 1-based line of its first mention:

    [model.mhc]          -> ("model",), ("model", "mhc")
    streams = 4          -> ("model", "mhc", "streams")
    moe = {top_k = 2}    -> ("model", "moe"), ("model", "moe", "top_k")

The scanner assumes the text already parsed with tomllib; on anything it does not
understand it stops and returns what it has (line numbers are best effort, never an error).
"""

from __future__ import annotations

import bisect
import tomllib

Path = tuple[str, ...]

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.newlines = [i for i, c in enumerate(text) if c == "\n"]
        self.lines: dict[Path, int] = {}
        self.array_tables: dict[Path, int] = {}

    # -- positions ---------------------------------------------------------------------
    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_left(self.newlines, self.pos if pos is None else pos) + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def record(self, path: Path, line: int) -> None:
        for i in range(1, len(path) + 1):
            self.lines.setdefault(path[:i], line)

    # -- whitespace and comments -------------------------------------------------------
    def skip_space(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    # -- keys ----------------------------------------------------------------------------
    def key(self) -> Path:
        parts: list[str] = []
        while True:
            self.skip_space(newlines=False)
            c = self.peek()
            if c in ('"', "'"):
                start = self.pos
                self.string()
                parts.append(tomllib.loads("k = " + self.text[start : self.pos])["k"])
            else:
                start = self.pos
                while self.pos < len(self.text) and self.text[self.pos] in _BARE:
                    self.pos += 1
                if self.pos == start:
                    raise ValueError("key expected")
                parts.append(self.text[start : self.pos])
            self.skip_space(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    # -- values --------------------------------------------------------------------------
    def string(self) -> None:
        for quote in ('"""', "'''"):
            if self.peek(3) == quote:
                self.pos += 3
                while True:
                    end = self.text.find(quote, self.pos)
                    if end < 0:
                        raise ValueError("unterminated string")
                    if quote == '"""' and _escaped(self.text, end):
                        self.pos = end + 1
                        continue
                    self.pos = end + 3
                    while self.peek() == quote[0] and self.peek(3) != quote:  # up to 2 quotes end the body
                        self.pos += 1
                    return
        quote = self.peek()
        self.pos += 1
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and quote == '"':
                self.pos += 2
                continue
            self.pos += 1
            if c == quote:
                return
        raise ValueError("unterminated string")

    def value(self, path: Path) -> None:
        self.skip_space(newlines=False)
        c = self.peek()
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.items("]", lambda: self.value(path), newlines=True)
        elif c == "{":
            self.items("}", lambda: self.inline_pair(path), newlines=False)
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}\n#":
                self.pos += 1

    def items(self, close: str, item, newlines: bool) -> None:
        """An array or inline table from its opening bracket: `item()` per element up to `close`."""
        self.pos += 1
        while True:
            self.skip_space(newlines=newlines)
            if self.peek() == close:
                self.pos += 1
                return
            item()
            self.skip_space(newlines=newlines)
            if self.peek() == ",":
                self.pos += 1

    def inline_pair(self, path: Path) -> None:
        line = self.line()
        sub = path + self.key()
        self.record(sub, line)
        self.expect("=")
        self.value(sub)

    def expect(self, char: str) -> None:
        self.skip_space(newlines=False)
        if self.peek() != char:
            raise ValueError(f"{char!r} expected")
        self.pos += 1

    # -- document ------------------------------------------------------------------------
    def document(self) -> None:
        table: Path = ()
        while True:
            self.skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self.line()
            if self.peek(2) == "[[":
                self.pos += 2
                path = self.key()
                self.expect("]")
                self.expect("]")
                index = self.array_tables.get(path, -1) + 1
                self.array_tables[path] = index
                table = path + (str(index),)
                self.record(table, line)
            elif self.peek() == "[":
                self.pos += 1
                table = self.key()
                self.expect("]")
                self.record(table, line)
            else:
                path = table + self.key()
                self.record(path, line)
                self.expect("=")
                self.value(path)


def _escaped(text: str, pos: int) -> bool:
    """True if the character at `pos` is preceded by an odd number of backslashes."""
    count = 0
    while pos - count - 1 >= 0 and text[pos - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def key_lines(text: str) -> dict[Path, int]:
    """TOML text -> {key path: 1-based line of its first mention} (best effort)."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (ValueError, IndexError, tomllib.TOMLDecodeError):
        pass
    return scanner.lines
