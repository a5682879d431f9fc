"""A small evaluator of Go's text/template, for the constructs Ollama's chat templates use: text, `{{ .Field }}`,
`{{ $v.Field }}`, `range` (with `$i, $m :=`), `if`/`else`, `eq`/`ne`/`and`/`or`/`not`/`len`, parentheses, string
and integer literals, and `{{-`/`-}}` whitespace trimming. It follows the Go semantics of those (truthiness:
false, 0, "" and empty lists are false) so the tests can render a Modelfile TEMPLATE without Ollama.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|-?\d+|[A-Za-z_]\w*)')
_FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _true(a), "len": len,
          "and": lambda *a: next((x for x in a if not _true(x)), a[-1]),
          "or": lambda *a: next((x for x in a if _true(x)), a[-1])}


def _true(value: Any) -> bool:
    return bool(value) if value is not None else False


def _pieces(source: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", body) in order, with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        text = text.lstrip() if trim_next else text
        out.append(("text", text.rstrip() if m.group(1) else text))
        out.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = source[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(pieces: list[tuple[str, str]], i: int = 0) -> tuple[list[Any], int, str]:
    """Nodes up to an `end`/`else` (returned as the stop word) or the end."""
    nodes: list[Any] = []
    while i < len(pieces):
        kind, body = pieces[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body in ("end", "else"):
            return nodes, i, body
        elif body.startswith(("range ", "if ")):
            word, _, rest = body.partition(" ")
            block, i, stop = _parse(pieces, i)
            other: list[Any] = []
            if stop == "else":
                other, i, _ = _parse(pieces, i)
            nodes.append((word, rest, block, other))
        else:
            nodes.append(("expr", body))
    return nodes, i, ""


def _lookup(path: str, dot: Any, variables: dict[str, Any]) -> Any:
    head, *fields = path.split(".")
    value = variables[head] if head else dot
    for f in (p for p in fields if p):
        value = value[f]
    return value


def _eval(tokens: list[str], dot: Any, variables: dict[str, Any]) -> Any:
    """A command: one operand, or a function applied to the operands after it."""
    args: list[Any] = []
    while tokens and tokens[0] != ")":
        t = tokens.pop(0)
        if t == "(":
            args.append(_eval(tokens, dot, variables))
            tokens.pop(0)
        elif t.startswith('"'):
            args.append(json.loads(t))
        elif re.fullmatch(r"-?\d+", t):
            args.append(int(t))
        elif t.startswith(("$", ".")):
            args.append(_lookup(t, dot, variables))
        else:
            args.append(_FUNCS[t])
    return args[0](*args[1:]) if callable(args[0]) else args[0]


def _expr(text: str, dot: Any, variables: dict[str, Any]) -> Any:
    return _eval(_TOKEN.findall(text), dot, variables)


def _run(nodes: list[Any], dot: Any, variables: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            out.append(str(_expr(node[1], dot, variables)))
        elif node[0] == "if":
            _run(node[2] if _true(_expr(node[1], dot, variables)) else node[3], dot, variables, out)
        else:  # range [$i, $m :=] PIPE
            names, _, pipe = node[1].rpartition(":=")
            keys = [n.strip() for n in names.split(",")] if names else []
            for index, item in enumerate(_expr(pipe, dot, variables)):
                bound = dict(zip(keys, [index, item] if len(keys) == 2 else [item], strict=False))
                _run(node[2], item, {**variables, **bound}, out)


def render(source: str, data: dict[str, Any]) -> str:
    """The text `source` renders to with `data` as the dot."""
    nodes, _, _ = _parse(_pieces(source))
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)
