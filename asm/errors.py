"""The one exception type of the assembler toolkit, carrying the source location it is about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLocation:
    """Where a statement came from: file, 1-based line, the line's text, and the macro expansions it is inside."""

    file: str
    line: int
    text: str
    # Outermost first: "macro NAME invoked at file:line" for each expansion this line is inside.
    expansions: tuple[str, ...] = ()
    # Inside a macro: the body line after its parameters were substituted.
    expanded: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class AsmError(Exception):
    """An assembly failed; the message names file:line and quotes the offending source line."""

    def __init__(self, message: str, location: SourceLocation | None = None):
        self.message = message
        self.location = location
        super().__init__(self._render())

    def _render(self) -> str:
        if self.location is None:
            return self.message
        rendered = f"{self.location}: {self.message}\n    {self.location.text.strip()}"
        if self.location.expanded is not None and self.location.expanded.strip() != self.location.text.strip():
            rendered += f"\n    (expanded: {self.location.expanded.strip()})"
        for expansion in reversed(self.location.expansions):
            rendered += f"\n  in {expansion}"
        return rendered

    def __str__(self) -> str:
        return self._render()


class SymbolNotFound(AsmError, KeyError):
    """Image.symbol() was asked for a label the image does not define (also a KeyError)."""

    def __str__(self) -> str:
        return self._render()
