"""A safe SQL predicate parser: a ``where`` string to a polars expression over named columns only.

The string is parsed here, never by an SQL engine, so it cannot name tables, files, subqueries or
any function outside a short list: it is a predicate over the store's own columns. What it may
contain:

- column names (``year``, or quoted ``"my col"``) and literals: numbers, ``'strings'`` (``''`` for a
  quote), ``TRUE``, ``FALSE``, ``NULL``;
- comparisons ``= == != <> < <= > >=``, ``AND``, ``OR``, ``NOT``, parentheses;
- ``x [NOT] IN (literal, ...)``, ``x [NOT] BETWEEN a AND b``, ``x IS [NOT] NULL``,
  ``x [NOT] LIKE 'pattern'`` / ``ILIKE`` (``%`` any run, ``_`` one character, ``\\%`` and
  ``\\_`` themselves);
- arithmetic ``+ - * / %`` (``/`` is true division, ``%`` has the sign of its left side), string
  concatenation ``||``;
- the functions ``lower``, ``upper``, ``length``, ``trim``, ``abs``, ``round``, ``floor``, ``ceil``,
  ``coalesce``.

Anything else is a :class:`~embtools.errors.FilterError` whose message quotes only the string itself
and the store's column names.

Examples
--------
>>> import polars as pl
>>> df = pl.DataFrame({"label": ["a", "b", "A"], "year": [2019, 2021, 2022]})
>>> df.filter(parse_predicate("lower(label) = 'a' AND year BETWEEN 2020 AND 2030"))["year"].to_list()
[2022]
>>> df.filter(parse_predicate("label LIKE 'b%' OR year IN (2019)", df.columns))["label"].to_list()
['a', 'b']
>>> parse_predicate("year = (SELECT 1)", df.columns)
Traceback (most recent call last):
...
embtools.errors.FilterError: where 'year = (SELECT 1)': where may not contain SELECT: a where is a predicate over the store's columns (at position 8)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from embtools.errors import FilterError

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_OPERATORS",
    "check_expression_columns",
    "describe",
    "parse_predicate",
    "to_expression",
]

#: nesting (parentheses, NOT, unary minus) deeper than this is refused (no RecursionError)
MAX_DEPTH = 64
#: a where string longer than this is refused
MAX_LENGTH = 100_000
#: operators and function calls allowed in one where (polars plans long chains slowly)
MAX_OPERATORS = 500

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")*"|`(?:[^`]|``)*`)
  | (?P<id>[^\W\d]\w*)
  | (?P<op><=|>=|<>|!=|==|\|\||[=<>+\-*/%(),])
""", re.VERBOSE)

_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE", "BETWEEN", "LIKE", "ILIKE"}
#: words of SQL that a predicate never needs: named in the error
_FORBIDDEN = {"SELECT", "FROM", "WITH", "UNION", "JOIN", "EXISTS", "VALUES", "TABLE", "INTO",
              "INSERT", "UPDATE", "DELETE", "DROP", "CREATE", "COPY", "ATTACH", "LIMIT"}

_COMPARE: dict[str, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    "=": lambda a, b: a == b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
_ARITH: dict[str, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "%": lambda a, b: (a.abs() % b.abs()) * a.sign(),  # SQL's remainder: the sign of a
    "||": lambda a, b: a.cast(pl.String) + b.cast(pl.String),
}


def _round(x: pl.Expr, *digits: Any) -> pl.Expr:
    return x.round(int(digits[0]) if digits else 0)


#: name -> (min args, max args, builder); the second and later arguments of round are literals
FUNCTIONS: dict[str, tuple[int, int, Callable[..., pl.Expr]]] = {
    "lower": (1, 1, lambda x: x.str.to_lowercase()),
    "upper": (1, 1, lambda x: x.str.to_uppercase()),
    "length": (1, 1, lambda x: x.str.len_chars()),
    "char_length": (1, 1, lambda x: x.str.len_chars()),
    "trim": (1, 1, lambda x: x.str.strip_chars()),
    "abs": (1, 1, lambda x: x.abs()),
    "floor": (1, 1, lambda x: x.floor()),
    "ceil": (1, 1, lambda x: x.ceil()),
    "round": (1, 2, _round),
    "coalesce": (1, 64, lambda *xs: pl.coalesce(*xs)),
}


class _Lit:
    """A literal value as parsed (kept apart from expressions for IN lists, LIKE and round)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def expr(self) -> pl.Expr:
        return pl.lit(self.value)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise FilterError(f"unexpected character {text[i]!r} at position {i} of {text!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group(), i))
        i = m.end()
    return out


class _Parser:
    def __init__(self, text: str, columns: Sequence[str] | None) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.ops = 0
        self.columns = None if columns is None else list(columns)

    # -- helpers -------------------------------------------------------------------------------
    def fail(self, what: str, at: int | None = None) -> FilterError:
        if at is None:
            at = self.toks[self.i][2] if self.i < len(self.toks) else len(self.text)
        text = self.text if len(self.text) <= 120 else self.text[:120] + "..."
        return FilterError(f"where {text!r}: {what} (at position {at})")

    def peek(self, offset: int = 0) -> tuple[str, str, int] | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def word(self, offset: int = 0) -> str | None:
        """The upper-cased keyword at the cursor (None for anything else)."""
        t = self.peek(offset)
        return t[1].upper() if t is not None and t[0] == "id" else None

    def accept_word(self, *words: str) -> str | None:
        w = self.word()
        if w in words:
            self.count()
            self.i += 1
            return w
        return None

    def accept_op(self, *ops: str) -> str | None:
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] in ops:
            if t[1] not in "(),":
                self.count()
            self.i += 1
            return t[1]
        return None

    def count(self) -> None:
        self.ops += 1
        if self.ops > MAX_OPERATORS:
            raise self.fail(f"where has more than {MAX_OPERATORS} operators (use x IN (...) for "
                            "long lists of values)")

    def expect_op(self, op: str) -> None:
        if self.accept_op(op) is None:
            raise self.fail(f"expected {op!r}")

    def nested(self, parse: Callable[[], Any]) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"where is nested more than {MAX_DEPTH} levels deep")
        try:
            return parse()
        finally:
            self.depth -= 1

    @staticmethod
    def as_expr(node: pl.Expr | _Lit) -> pl.Expr:
        return node.expr() if isinstance(node, _Lit) else node

    # -- grammar -------------------------------------------------------------------------------
    def parse(self) -> pl.Expr:
        if not self.toks:
            raise FilterError("where is an empty string; pass None to search every row")
        node = self.as_expr(self.disjunction())
        if self.i < len(self.toks):
            raise self.fail(f"unexpected {self.toks[self.i][1]!r}")
        return node

    def disjunction(self) -> pl.Expr | _Lit:
        node = self.conjunction()
        while self.accept_word("OR"):
            node = self.as_expr(node) | self.as_expr(self.conjunction())
        return node

    def conjunction(self) -> pl.Expr | _Lit:
        node = self.negation()
        while self.accept_word("AND"):
            node = self.as_expr(node) & self.as_expr(self.negation())
        return node

    def negation(self) -> pl.Expr | _Lit:
        if self.accept_word("NOT"):
            return ~self.as_expr(self.nested(self.negation))
        return self.predicate()

    def predicate(self) -> pl.Expr | _Lit:
        left = self.additive()
        op = self.accept_op(*_COMPARE)
        if op is not None:
            return _COMPARE[op](self.as_expr(left), self.as_expr(self.additive()))
        if self.accept_word("IS"):
            negate = self.accept_word("NOT") is not None
            what = self.accept_word("NULL", "TRUE", "FALSE")
            if what is None:
                raise self.fail("expected NULL, TRUE or FALSE after IS")
            x = self.as_expr(left)
            out = x.is_null() if what == "NULL" else (x == (what == "TRUE")).fill_null(False)
            return ~out if negate else out
        negate = self.word() == "NOT" and self.word(1) in ("IN", "BETWEEN", "LIKE", "ILIKE")
        if negate:
            self.i += 1
        x = self.as_expr(left)
        if self.accept_word("IN"):
            out = x.is_in(pl.Series(self.literal_list(), strict=False).implode())
        elif self.accept_word("BETWEEN"):
            low = self.as_expr(self.additive())
            if self.accept_word("AND") is None:
                raise self.fail("expected AND in BETWEEN")
            out = (x >= low) & (x <= self.as_expr(self.additive()))
        elif (like := self.accept_word("LIKE", "ILIKE")) is not None:
            out = x.str.contains(self.like_pattern(like == "ILIKE"))
        elif negate:  # pragma: no cover - NOT is only taken before these words
            raise self.fail("expected IN, BETWEEN or LIKE after NOT")
        else:
            return left
        return ~out if negate else out

    def literal_list(self) -> list[Any]:
        self.expect_op("(")
        values: list[Any] = []
        while True:
            node = self.additive()
            if not isinstance(node, _Lit):
                raise self.fail("IN (...) takes literal values only")
            values.append(node.value)
            if self.accept_op(")"):
                return values
            self.expect_op(",")

    def like_pattern(self, ignore_case: bool) -> str:
        t = self.peek()
        if t is None or t[0] != "str":
            raise self.fail("LIKE takes a 'string' pattern")
        self.i += 1
        pattern = t[1][1:-1].replace("''", "'")
        out = ["(?s", "i" if ignore_case else "", ")^"]
        escaped = False
        for ch in pattern:
            if escaped or ch not in "%_\\":
                out.append("\\" + ch if ch in "\\.+*?()|[]{}^$" else ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(".*" if ch == "%" else ".")
        if escaped:
            raise self.fail("a LIKE pattern may not end with a lone backslash")
        return "".join(out) + "$"

    def additive(self) -> pl.Expr | _Lit:
        node = self.multiplicative()
        while (op := self.accept_op("+", "-", "||")) is not None:
            node = _ARITH[op](self.as_expr(node), self.as_expr(self.multiplicative()))
        return node

    def multiplicative(self) -> pl.Expr | _Lit:
        node = self.unary()
        while (op := self.accept_op("*", "/", "%")) is not None:
            node = _ARITH[op](self.as_expr(node), self.as_expr(self.unary()))
        return node

    def unary(self) -> pl.Expr | _Lit:
        op = self.accept_op("-", "+")
        if op is None:
            return self.primary()
        node = self.nested(self.unary)
        if op == "+":
            return node
        if isinstance(node, _Lit) and isinstance(node.value, (int, float)) and not isinstance(
                node.value, bool):
            return _Lit(-node.value)
        return -self.as_expr(node)

    def primary(self) -> pl.Expr | _Lit:
        t = self.peek()
        if t is None:
            raise self.fail("unexpected end of the where string")
        kind, text, at = t
        self.i += 1
        if kind == "num":
            try:
                value: Any = int(text) if re.fullmatch(r"\d+", text) else float(text)
            except ValueError:  # pragma: no cover - the token pattern only matches numbers
                raise self.fail(f"bad number {text!r}", at) from None
            if isinstance(value, int) and value >= 2**63:
                raise self.fail(f"the number {text} is too large", at)
            return _Lit(value)
        if kind == "str":
            return _Lit(text[1:-1].replace("''", "'"))
        if kind == "qid":
            return self.column(text[1:-1].replace(text[0] * 2, text[0]), at)
        if kind == "op":
            if text == "(":
                node = self.nested(self.disjunction)
                self.expect_op(")")
                return node
            raise self.fail(f"unexpected {text!r}", at)
        word = text.upper()
        if word in ("TRUE", "FALSE"):
            return _Lit(word == "TRUE")
        if word == "NULL":
            return _Lit(None)
        if word in _FORBIDDEN:
            raise self.fail(f"where may not contain {word}: a where is a predicate over the "
                            "store's columns", at)
        if word in _KEYWORDS:
            raise self.fail(f"unexpected {text!r}", at)
        if self.accept_op("("):
            self.count()
            return self.call(text, at)
        return self.column(text, at)

    def call(self, name: str, at: int) -> pl.Expr:
        spec = FUNCTIONS.get(name.lower())
        if spec is None:
            raise self.fail(f"the function {name!r} is not allowed in where (allowed: "
                            f"{', '.join(sorted(FUNCTIONS))})", at)
        lo, hi, build = spec
        args: list[pl.Expr | _Lit] = []
        if not self.accept_op(")"):
            while True:
                args.append(self.nested(self.disjunction))
                if self.accept_op(")"):
                    break
                self.expect_op(",")
        if not lo <= len(args) <= hi:
            raise self.fail(f"{name}() takes {lo if lo == hi else f'{lo} to {hi}'} argument(s), "
                            f"got {len(args)}", at)
        if name.lower() == "round":
            if len(args) == 2 and not (isinstance(args[1], _Lit) and isinstance(args[1].value, int)):
                raise self.fail("round()'s digits must be an integer literal", at)
            return build(self.as_expr(args[0]), *[a.value for a in args[1:] if isinstance(a, _Lit)])
        return build(*[self.as_expr(a) for a in args])

    def column(self, name: str, at: int) -> pl.Expr:
        if self.columns is not None and name not in self.columns:
            raise self.fail(f"unknown column {name!r}; the store's columns: {self.columns}", at)
        return pl.col(name)


def parse_predicate(text: str, columns: Sequence[str] | None = None) -> pl.Expr:
    """The polars expression of the SQL predicate ``text`` (see the module docs for the grammar).

    ``columns``: the names a column reference may use (None: any name). Raises FilterError for
    anything that is not such a predicate; nothing is read or evaluated here.
    """
    if not isinstance(text, str):
        raise FilterError(f"where must be a string here, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"where is longer than {MAX_LENGTH:,} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FilterError("where is not valid Unicode (a lone surrogate?)") from None
    return _Parser(text, columns).parse()


def to_expression(where: Any, columns: Sequence[str] | None = None) -> pl.Expr | None:
    """``where`` as a polars expression: None stays None, SQL strings go through the safe parser
    (:func:`parse_predicate`; no SQL engine ever sees them).

    ``columns``: the store's column names; a SQL string or polars expression naming any other
    column is a FilterError (None: not checked). Raises FilterError for a string that is not a
    predicate, or anything that is neither a string nor a polars expression.
    """
    if where is None:
        return None
    if isinstance(where, pl.Expr):
        if columns is not None:
            check_expression_columns(where, columns)
        return where
    if isinstance(where, str):
        if not where.strip():
            raise FilterError("where is an empty string; pass None to search every row")
        return parse_predicate(where, columns)
    raise FilterError(
        f"where must be a polars expression (pl.col('label') == 'x') or a SQL predicate string "
        f"(\"label = 'x'\"), got {type(where).__name__}"
    )


def check_expression_columns(expr: pl.Expr, columns: Sequence[str]) -> None:
    """FilterError when the polars expression ``expr`` reads a column not in ``columns``."""
    try:
        roots = expr.meta.root_names()
    except Exception as err:  # polars refuses to list them for some expressions
        raise FilterError(f"cannot inspect the filter {describe(expr)}: {type(err).__name__}") from None
    unknown = [name for name in roots if name not in columns]
    if unknown:
        raise FilterError(f"the filter {describe(expr)} names unknown column(s) {unknown}; "
                          f"the store's columns: {list(columns)}")


def describe(where: Any, limit: int = 200) -> str:
    """A short, printable description of ``where`` for messages (never an object repr)."""
    text = repr(where) if isinstance(where, str) else str(where)
    return text if len(text) <= limit else text[:limit] + "..."
