"""Tokenizer and recursive-descent parser for header-rule conditions.

The language is the SpEL subset that ModelArts "custom settings" use:

    condition := or
    or        := and (('or' | '||') and)*
    and       := cmp (('and' | '&&') cmp)*
    cmp       := mod (('==' | '!=' | '<' | '<=' | '>' | '>=') mod
                      | 'matches' STRING)?
    mod       := unary ('%' unary)*
    unary     := ('not' | '!') unary | postfix
    postfix   := primary ('.' 'hashCode' '(' ')')*
    primary   := VARIABLE | STRING | INTEGER | 'true' | 'false' | '(' or ')'

As in SpEL, 'not'/'!' is a unary operator and binds tighter than comparisons
(so `not #HEADER_a == 'x'` is `(not #HEADER_a) == 'x'`, a type error: write
`not (#HEADER_a == 'x')`), and comparisons do not chain. Keywords are
case-insensitive; variable names and `hashCode` are not (they are SpEL
variables and a Java method name).

Every error is a RuleSyntaxError carrying the 0-based character position.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BUILTINS", "MAX_NESTING", "RuleSyntaxError", "parse", "tokenize",
    "Node", "Var", "Str", "Int", "Bool", "HashCode", "Binary", "Matches", "Not",
]

BUILTINS = ("DOMAIN_NAME", "DOMAIN_ID", "PROJECT_NAME", "PROJECT_ID", "USER_NAME", "USER_ID")
HEADER_PREFIX = "HEADER_"
MAX_NESTING = 32          # parentheses and 'not' levels; keeps recursion and the VM stack bounded
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1

KEYWORDS = ("and", "or", "not", "matches", "true", "false")
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


class RuleSyntaxError(ValueError):
    """A condition that does not parse, does not type-check, or cannot be compiled.

    `position` is the 0-based character offset in the condition; `rule_index`
    is set when the condition belongs to a RuleSet.
    """

    def __init__(self, message: str, position: int, rule_index: int | None = None):
        super().__init__(message, position)
        self.message = message
        self.position = position
        self.rule_index = rule_index

    def __str__(self) -> str:
        text = f"position {self.position}: {self.message}"
        if self.rule_index is not None:
            text = f"rule {self.rule_index}: condition: {text}"
        return text

    def __reduce__(self):
        return (type(self), (self.message, self.position, self.rule_index))


# ---------------------------------------------------------------- tokens

@dataclass(frozen=True, slots=True)
class Token:
    kind: str        # 'var', 'str', 'int', 'kw', 'ident', 'op', 'eof'
    value: object    # var: ('header', lowered name) or ('builtin', NAME); str: text; int: value;
                     # kw: lowered keyword; ident: name; op: the operator text
    pos: int
    text: str        # the source text of the token
    offsets: tuple = ()  # str tokens: source position of each character of the value

    def describe(self) -> str:
        if self.kind == "eof":
            return "end of input"
        if self.kind == "str":
            return "a string literal"
        if self.kind == "int":
            return f"the integer {self.text}"
        return f"'{self.text}'"


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def tokenize(src: str) -> list[Token]:
    if not isinstance(src, str):
        raise TypeError(f"a condition must be a str, not {type(src).__name__}")
    toks: list[Token] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in " \t\r\n":
            i += 1
            continue
        start = i
        if c == "'":
            i += 1
            chars: list[str] = []
            offsets: list[int] = []
            while True:
                if i >= n:
                    raise RuleSyntaxError(
                        "unterminated string literal (expected a closing \"'\")", start)
                if src[i] == "'":
                    if i + 1 < n and src[i + 1] == "'":
                        chars.append("'")
                        offsets.append(i)
                        i += 2
                        continue
                    i += 1
                    break
                chars.append(src[i])
                offsets.append(i)
                i += 1
            offsets.append(i - 1)  # the closing quote: where the value ends
            toks.append(Token("str", "".join(chars), start, src[start:i], tuple(offsets)))
        elif c == '"':
            raise RuleSyntaxError("strings are written in single quotes ('...'), not double quotes",
                                  start)
        elif c == "#":
            i += 1
            while i < n and _is_name_char(src[i]):
                i += 1
            name = src[start + 1:i]
            if name.startswith(HEADER_PREFIX):
                while i < n and (_is_name_char(src[i]) or src[i] == "-"):
                    i += 1
                header = src[start + 1 + len(HEADER_PREFIX):i]
                if not header:
                    raise RuleSyntaxError("expected a header name after '#HEADER_'", i)
                toks.append(Token("var", ("header", header.lower()), start, src[start:i]))
            elif name in BUILTINS:
                toks.append(Token("var", ("builtin", name), start, src[start:i]))
            elif not name:
                raise RuleSyntaxError("expected a variable name after '#'", i)
            else:
                raise RuleSyntaxError(
                    f"unknown variable '#{name}': expected #HEADER_<name> or one of "
                    + ", ".join("#" + b for b in BUILTINS), start)
        elif c.isascii() and (c.isdigit() or (c == "-" and i + 1 < n and src[i + 1].isascii()
                                              and src[i + 1].isdigit())):
            i += 1
            while i < n and src[i].isascii() and src[i].isdigit():
                i += 1
            if i < n and (_is_name_char(src[i])
                          or (src[i] == "." and i + 1 < n and src[i + 1].isascii()
                              and src[i + 1].isdigit())):
                j = i
                while j < n and (_is_name_char(src[j]) or src[j] == "."):
                    j += 1
                raise RuleSyntaxError(
                    f"invalid number '{src[start:j]}': only decimal integers are supported", start)
            value = int(src[start:i])
            if not INT_MIN <= value <= INT_MAX:
                raise RuleSyntaxError(
                    f"integer {src[start:i]} is out of the 32-bit range", start)
            toks.append(Token("int", value, start, src[start:i]))
        elif c == "-":
            raise RuleSyntaxError("expected a digit after '-' (there is no subtraction)", i + 1)
        elif _is_name_char(c):
            while i < n and _is_name_char(src[i]):
                i += 1
            word = src[start:i]
            if word.lower() in KEYWORDS:
                toks.append(Token("kw", word.lower(), start, word))
            else:
                toks.append(Token("ident", word, start, word))
        else:
            two = src[i:i + 2]
            if two in ("==", "!=", "<=", ">=", "&&", "||"):
                i += 2
                toks.append(Token("op", two, start, two))
            elif c in "<>%!().":
                i += 1
                toks.append(Token("op", c, start, c))
            elif c == "=":
                raise RuleSyntaxError("unexpected '=': use '==' to compare", start)
            elif c in "&|":
                raise RuleSyntaxError(f"unexpected '{c}': use '{c}{c}'", start)
            else:
                raise RuleSyntaxError(f"unexpected character {c!r}", start)
    toks.append(Token("eof", None, n, ""))
    return toks


# ---------------------------------------------------------------- AST

class Node:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Var(Node):
    start: int
    kind: str      # 'header' or 'builtin'
    name: str      # header: lower-cased name; builtin: e.g. 'DOMAIN_NAME'
    text: str      # as written


@dataclass(frozen=True, slots=True)
class Str(Node):
    start: int
    value: str
    offsets: tuple = ()


@dataclass(frozen=True, slots=True)
class Int(Node):
    start: int
    value: int


@dataclass(frozen=True, slots=True)
class Bool(Node):
    start: int
    value: bool


@dataclass(frozen=True, slots=True)
class HashCode(Node):
    start: int
    pos: int       # the '.'
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary(Node):
    start: int
    pos: int       # the operator
    op: str        # '%', '==', '!=', '<', '<=', '>', '>=', 'and', 'or'
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Matches(Node):
    start: int
    pos: int       # the 'matches' keyword
    operand: Node
    pattern: Str


@dataclass(frozen=True, slots=True)
class Not(Node):
    start: int
    operand: Node


# ---------------------------------------------------------------- parser

class _Parser:
    def __init__(self, src: str):
        self.src = src
        self.toks = tokenize(src)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def advance(self) -> Token:
        t = self.toks[self.i]
        self.i += 1
        return t

    def is_kw(self, *words: str) -> bool:
        t = self.tok
        return t.kind == "kw" and t.value in words

    def is_op(self, *ops: str) -> bool:
        t = self.tok
        return t.kind == "op" and t.value in ops

    def fail(self, message: str, tok: Token | None = None):
        tok = tok or self.tok
        raise RuleSyntaxError(message, tok.pos)

    def nest(self, tok: Token):
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise RuleSyntaxError(f"expression nested too deeply (at most {MAX_NESTING} levels)",
                                  tok.pos)

    def parse(self) -> Node:
        if self.tok.kind == "eof":
            self.fail("expected an expression, found end of input")
        node = self.parse_or()
        t = self.tok
        if t.kind != "eof":
            if t.kind == "op" and t.value == ")":
                self.fail("unmatched ')'")
            if (t.kind == "op" and t.value in COMPARISONS) or (t.kind == "kw" and t.value == "matches"):
                self.fail(f"unexpected {t.describe()}: comparisons do not chain, "
                          "combine them with 'and' / 'or'")
            self.fail(f"expected 'and', 'or' or end of input, found {t.describe()}")
        return node

    def parse_or(self) -> Node:
        left = self.parse_and()
        while self.is_kw("or") or self.is_op("||"):
            op = self.advance()
            right = self.parse_and()
            left = Binary(left.start, op.pos, "or", left, right)
        return left

    def parse_and(self) -> Node:
        left = self.parse_cmp()
        while self.is_kw("and") or self.is_op("&&"):
            op = self.advance()
            right = self.parse_cmp()
            left = Binary(left.start, op.pos, "and", left, right)
        return left

    def parse_cmp(self) -> Node:
        left = self.parse_mod()
        if self.is_op(*COMPARISONS):
            op = self.advance()
            right = self.parse_mod()
            return Binary(left.start, op.pos, op.value, left, right)
        if self.is_kw("matches"):
            op = self.advance()
            t = self.tok
            if t.kind != "str":
                self.fail(f"expected a string literal after '{op.text}', found {t.describe()}")
            self.advance()
            return Matches(left.start, op.pos, left, Str(t.pos, t.value, t.offsets))
        return left

    def parse_mod(self) -> Node:
        left = self.parse_unary()
        while self.is_op("%"):
            op = self.advance()
            right = self.parse_unary()
            left = Binary(left.start, op.pos, "%", left, right)
        return left

    def parse_unary(self) -> Node:
        if self.is_kw("not") or self.is_op("!"):
            op = self.advance()
            self.nest(op)
            operand = self.parse_unary()
            self.depth -= 1
            return Not(op.pos, operand)
        return self.parse_postfix()

    def parse_postfix(self) -> Node:
        node = self.parse_primary()
        while self.is_op("."):
            dot = self.advance()
            t = self.tok
            if t.kind != "ident" or t.value != "hashCode":
                self.fail(f"expected 'hashCode()' after '.', found {t.describe()}")
            self.advance()
            if not self.is_op("("):
                self.fail(f"expected '(' after 'hashCode', found {self.tok.describe()}")
            self.advance()
            if not self.is_op(")"):
                self.fail(f"expected ')' after 'hashCode(', found {self.tok.describe()}")
            self.advance()
            node = HashCode(node.start, dot.pos, node)
        return node

    def parse_primary(self) -> Node:
        t = self.tok
        if t.kind == "var":
            self.advance()
            kind, name = t.value
            return Var(t.pos, kind, name, t.text)
        if t.kind == "str":
            self.advance()
            return Str(t.pos, t.value, t.offsets)
        if t.kind == "int":
            self.advance()
            return Int(t.pos, t.value)
        if t.kind == "kw" and t.value in ("true", "false"):
            self.advance()
            return Bool(t.pos, t.value == "true")
        if t.kind == "op" and t.value == "(":
            self.advance()
            self.nest(t)
            inner = self.parse_or()
            self.depth -= 1
            if not self.is_op(")"):
                self.fail(f"expected ')' to close the '(' at position {t.pos}, "
                          f"found {self.tok.describe()}")
            self.advance()
            return inner
        if t.kind == "ident":
            self.fail(f"unexpected name '{t.text}': variables start with '#' "
                      "and strings are in single quotes")
        self.fail(f"expected a variable, a string, an integer or '(', found {t.describe()}")


def parse(src: str) -> Node:
    """Parse a condition into its AST; raises RuleSyntaxError."""
    return _Parser(src).parse()
