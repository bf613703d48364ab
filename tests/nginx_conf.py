"""A small nginx.conf reader: directives and blocks as a tree, comments dropped, quotes kept as written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Directive", "parse"]

# A quoted string (escapes allowed), a brace, a semicolon, or a bare word (in which ${name} is one
# piece, braces and all); comments run to the line's end.
_TOKEN = re.compile(r"""\s*(?:#[^\n]*|("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[{};]|(?:\$\{[^}]*\}|[^\s{};"'])+))""")


@dataclass
class Directive:
    """`name args...;` or `name args... { block }`."""

    name: str
    args: list[str]
    block: list[Directive] | None = field(default=None)


def _tokens(text: str) -> list[str]:
    tokens, at = [], 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None or match.end() == at:
            if text[at:].strip():
                raise ValueError(f"cannot read nginx.conf at offset {at}: {text[at : at + 40]!r}")
            break
        at = match.end()
        if match.group(1) is not None:
            tokens.append(match.group(1))
    return tokens


def parse(text: str) -> list[Directive]:
    """The directives of a whole file."""
    tokens = _tokens(text)
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            if not words:
                raise ValueError("empty directive")
            stack[-1].append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            directive = Directive(words[0], words[1:], [])
            stack[-1].append(directive)
            assert directive.block is not None
            stack.append(directive.block)
            words = []
        elif token == "}":
            if words or len(stack) == 1:
                raise ValueError("unbalanced }")
            stack.pop()
        else:
            words.append(token)
    if words or len(stack) != 1:
        raise ValueError("unterminated directive or block")
    return stack[0]
