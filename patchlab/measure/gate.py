"""Gate expressions: what a ported patch must satisfy before its alias moves (``nfr <= 0.05``,
``accuracy >= old - 0.01``, ``verdict != 'do not port'``).

A small, safe parser (no ``eval``): numbers, single- or double-quoted strings, the names in :data:`NAMES`,
``+ - * /``, comparisons (``< <= > >= == !=``, chains allowed), ``and``/``or``/``not`` and parentheses.
Types are checked when parsing (``verdict`` is text, the rest are numbers; a gate must be a comparison), so
a gate that would never evaluate is refused when it is set, with the position of the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from patchlab.errors import GateExpressionError

#: name -> (type, meaning)
NAMES: dict[str, tuple[str, str]] = {
    "nfr": ("num", "negative flip rate of the ported patch against the previous version (0 to 1)"),
    "pfr": ("num", "positive flip rate against the previous version (0 to 1)"),
    "accuracy": ("num", "the ported patch's accuracy on its suite (0 to 1)"),
    "old": ("num", "the previous version's accuracy on the same suite"),
    "verdict": ("str", "the weight-space verdict: 'safe to port', 'port with care' or 'do not port'"),
    "reliability": ("num", "an edit patch: WILD reliability of its edit set on the new base (0 to 1)"),
    "generalization": ("num", "an edit patch: WILD generalization (rephrasings) on the new base (0 to 1)"),
    "locality": ("num", "an edit patch: WILD locality against the new base's unedited outputs (0 to 1)"),
}
VERDICTS = ("safe to port", "port with care", "do not port")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<str>'[^']*'|\"[^\"]*\")"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\)))"
)
_CMP = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


class _Unknown(Exception):
    """A name the gate needs has no value (e.g. no previous accuracy)."""


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | str | name | op | end
    text: str
    pos: int


def _tokens(src: str) -> list[_Tok]:
    out, i = [], 0
    while i < len(src):
        if src[i:].strip() == "":
            break
        m = _TOKEN.match(src, i)
        if m is None or m.end() == i:
            j = i + len(src[i:]) - len(src[i:].lstrip())
            raise _error(src, j, f"unexpected character {src[j]!r}")
        kind = m.lastgroup or "op"
        start = m.start(kind)
        out.append(_Tok(kind, m.group(kind), start))
        i = m.end()
    out.append(_Tok("end", "", len(src)))
    return out


def _error(src: str, pos: int, msg: str) -> GateExpressionError:
    return GateExpressionError(f"gate {src!r} does not parse at position {pos + 1}: {msg}")


# ---- the tree: each node knows its type, its value and how to show itself with values filled in ----------


@dataclass(frozen=True)
class _Node:
    type: str  # num | str | bool

    def value(self, env: Mapping[str, Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def show(self, env: Mapping[str, Any]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _Lit(_Node):
    v: Any

    def value(self, env):
        return self.v

    def show(self, env):
        return repr(self.v) if self.type == "str" else f"{self.v:g}"


@dataclass(frozen=True)
class _Name(_Node):
    name: str

    def value(self, env):
        v = env.get(self.name)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise _Unknown(self.name)
        return v

    def show(self, env):
        v = env.get(self.name)
        if v is None:
            return f"{self.name}=?"
        return f"{self.name}=" + (repr(v) if self.type == "str" else f"{float(v):.4g}")


@dataclass(frozen=True)
class _Unary(_Node):
    op: str
    arg: _Node

    def value(self, env):
        return -self.arg.value(env) if self.op == "-" else not self.arg.value(env)

    def show(self, env):
        return f"-{self.arg.show(env)}" if self.op == "-" else f"not {self.arg.show(env)}"


@dataclass(frozen=True)
class _Binary(_Node):
    op: str
    left: _Node
    right: _Node

    def value(self, env):
        if self.op == "and":
            return self.left.value(env) and self.right.value(env)
        if self.op == "or":
            return self.left.value(env) or self.right.value(env)
        a, b = self.left.value(env), self.right.value(env)
        if self.op == "/" and b == 0:
            raise _Unknown("a division by zero")
        return _ARITH[self.op](a, b)

    def show(self, env):
        return f"({self.left.show(env)} {self.op} {self.right.show(env)})"


@dataclass(frozen=True)
class _Compare(_Node):
    items: tuple[_Node, ...]
    ops: tuple[str, ...]

    def value(self, env):
        vals = [n.value(env) for n in self.items]
        return all(_CMP[op](a, b) for op, a, b in zip(self.ops, vals, vals[1:], strict=False))

    def show(self, env):
        parts = [self.items[0].show(env)]
        for op, n in zip(self.ops, self.items[1:], strict=True):
            parts += [op, n.show(env)]
        return " ".join(parts)


class _Parser:
    def __init__(self, src: str) -> None:
        self.src, self.toks, self.i = src, _tokens(src), 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def is_(self, *texts: str) -> bool:
        return self.tok.kind in ("op", "name") and self.tok.text in texts

    def parse(self) -> _Node:
        if self.tok.kind == "end":
            raise _error(self.src, 0, "the gate is empty; write e.g. nfr <= 0.05")
        node = self.or_()
        if self.tok.kind != "end":
            raise _error(self.src, self.tok.pos, f"unexpected {self.tok.text!r} (expected the end, 'and' or 'or')")
        if node.type != "bool":
            raise _error(self.src, 0, "a gate must be a comparison, e.g. nfr <= 0.05")
        return node

    def or_(self) -> _Node:
        node = self.and_()
        while self.is_("or"):
            t = self.take()
            right = self.and_()
            self.need_bool(node, right, t)
            node = _Binary("bool", "or", node, right)
        return node

    def and_(self) -> _Node:
        node = self.not_()
        while self.is_("and"):
            t = self.take()
            right = self.not_()
            self.need_bool(node, right, t)
            node = _Binary("bool", "and", node, right)
        return node

    def need_bool(self, a: _Node, b: _Node, t: _Tok) -> None:
        if a.type != "bool" or b.type != "bool":
            raise _error(self.src, t.pos, f"'{t.text}' joins comparisons, e.g. nfr <= 0.05 {t.text} pfr >= 0")

    def not_(self) -> _Node:
        if self.is_("not"):
            t = self.take()
            arg = self.not_()
            if arg.type != "bool":
                raise _error(self.src, t.pos, "'not' applies to a comparison")
            return _Unary("bool", "not", arg)
        return self.compare()

    def compare(self) -> _Node:
        first_pos = self.tok.pos
        items, ops = [self.arith()], []
        while self.tok.kind == "op" and self.tok.text in _CMP:
            t = self.take()
            right = self.arith()
            left = items[-1]
            if left.type != right.type:
                raise _error(self.src, t.pos, f"cannot compare {_what(left)} with {_what(right)}")
            if left.type == "str" and t.text not in ("==", "!="):
                raise _error(self.src, t.pos, f"text is compared with == or != only, not {t.text}")
            for side in (left, right):
                if isinstance(side, _Lit) and side.type == "str" and side.v not in VERDICTS:
                    raise _error(
                        self.src, t.pos, f"{side.v!r} is not a verdict (one of {', '.join(map(repr, VERDICTS))})"
                    )
            items.append(right)
            ops.append(t.text)
        if not ops:
            if items[0].type == "bool":
                return items[0]
            if self.tok.kind == "end":
                raise _error(self.src, self.tok.pos, "expected a comparison (<, <=, >, >=, == or !=) here")
            return items[0]
        del first_pos
        return _Compare("bool", tuple(items), tuple(ops))

    def arith(self) -> _Node:
        node = self.term()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            t = self.take()
            node = self.num_binary(t, node, self.term())
        return node

    def term(self) -> _Node:
        node = self.unary()
        while self.tok.kind == "op" and self.tok.text in ("*", "/"):
            t = self.take()
            node = self.num_binary(t, node, self.unary())
        return node

    def num_binary(self, t: _Tok, a: _Node, b: _Node) -> _Node:
        if a.type != "num" or b.type != "num":
            raise _error(self.src, t.pos, f"'{t.text}' needs numbers on both sides")
        return _Binary("num", t.text, a, b)

    def unary(self) -> _Node:
        if self.tok.kind == "op" and self.tok.text == "-":
            t = self.take()
            arg = self.unary()
            if arg.type != "num":
                raise _error(self.src, t.pos, "'-' needs a number")
            return _Unary("num", "-", arg)
        return self.atom()

    def atom(self) -> _Node:
        t = self.tok
        if t.kind == "num":
            self.take()
            return _Lit("num", float(t.text))
        if t.kind == "str":
            self.take()
            return _Lit("str", t.text[1:-1])
        if t.kind == "name" and t.text not in ("and", "or", "not"):
            self.take()
            if t.text not in NAMES:
                raise _error(self.src, t.pos, f"unknown name {t.text!r} (known: {', '.join(NAMES)})")
            return _Name(NAMES[t.text][0], t.text)
        if t.kind == "op" and t.text == "(":
            self.take()
            node = self.or_()
            if not (self.tok.kind == "op" and self.tok.text == ")"):
                raise _error(self.src, self.tok.pos, "expected ')'")
            self.take()
            return node
        found = "the end" if t.kind == "end" else repr(t.text)
        raise _error(self.src, t.pos, f"expected a number, a name or '(' but found {found}")


def _what(n: _Node) -> str:
    return {"num": "a number", "str": "text", "bool": "a comparison"}[n.type]


@dataclass(frozen=True)
class GateResult:
    expression: str
    passed: bool
    detail: str  # the expression with the values filled in, or why it could not be decided

    def to_json(self) -> dict[str, Any]:
        return {"expression": self.expression, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class Gate:
    """One parsed gate expression."""

    expression: str
    tree: _Node

    @classmethod
    def parse(cls, text: str) -> Gate:
        return cls(text.strip(), _Parser(text.strip()).parse())

    def check(self, values: Mapping[str, Any]) -> GateResult:
        """Decide the gate on ``values`` (``nfr``, ``pfr``, ``accuracy``, ``old``, ``verdict``); a value the
        gate needs that is missing fails it, saying which."""
        shown = self.tree.show(values)
        try:
            ok = bool(self.tree.value(values))
        except _Unknown as exc:
            return GateResult(self.expression, False, f"cannot decide: {exc.args[0]} is unknown ({shown})")
        return GateResult(self.expression, ok, f"{shown} is {'true' if ok else 'false'}")


def parse_gates(texts: list[str] | tuple[str, ...]) -> list[Gate]:
    return [Gate.parse(t) for t in texts]


def check_gates(texts: list[str] | tuple[str, ...], values: Mapping[str, Any]) -> list[GateResult]:
    return [g.check(values) for g in parse_gates(texts)]


__all__ = ["NAMES", "VERDICTS", "Gate", "GateResult", "check_gates", "parse_gates"]
