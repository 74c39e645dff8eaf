"""Type-check a condition's AST and compile it to a flat program for the native VM.

The program is a tuple of (opcode, argument) pairs in postfix order with
forward jumps for the short-circuit 'and'/'or', plus three constant tables:
strings (header keys already lower-cased, built-in names, literals), compiled
regexes (their bound `fullmatch`), nothing else. csrc/rules/rules.pyx runs it with a
C value stack; no Python AST is touched per request.

Static checks done here (all raise RuleSyntaxError with a position): operand
types of every operator, modulo by a literal zero (after folding constant
sub-expressions), invalid regexes (position inside the pattern), and the value
stack bound.
"""
from __future__ import annotations

import re

import re2

from gateway._native import rules as _vm
from gateway.rules.parser import (Binary, Bool, HashCode, Int, Matches, Node, Not, RuleSyntaxError,
                                  Str, Var, parse)

__all__ = ["compile_condition", "compile_ast", "java_hash", "java_mod", "disassemble"]

STR, INT, BOOL = "string", "integer", "condition"
_ARTICLE = {STR: "a string", INT: "an integer", BOOL: "a condition"}

OPNAMES = {getattr(_vm, name): name for name in dir(_vm) if name.startswith("OP_")}
_INT_CMP = {"<": _vm.OP_LT, "<=": _vm.OP_LE, ">": _vm.OP_GT, ">=": _vm.OP_GE}


def java_hash(s: str) -> int:
    """Java String.hashCode: over UTF-16 code units, wrapping as a signed 32-bit int."""
    h = 0
    for unit in _utf16_units(s):
        h = (31 * h + unit) & 0xFFFFFFFF
    return h - (1 << 32) if h >= (1 << 31) else h


def _utf16_units(s: str):
    for ch in s:
        c = ord(ch)
        if c >= 0x10000:
            c -= 0x10000
            yield 0xD800 + (c >> 10)
            yield 0xDC00 + (c & 0x3FF)
        else:
            yield c


def java_mod(a: int, b: int) -> int:
    """Java's int remainder: truncating division, the result has the sign of the dividend."""
    r = abs(a) % abs(b)
    return -r if a < 0 else r


class _Compiler:
    def __init__(self, src: str):
        self.src = src
        self.code: list[int] = []
        self.strings: list[str] = []
        self.string_index: dict[str, int] = {}
        self.patterns: list = []  # compiled RE2 patterns
        self.depth = 0
        self.max_depth = 0

    # ---------------------------------------------------------- typing + folding

    def check(self, node: Node) -> tuple[Node, str]:
        """Return the node with constant sub-expressions folded, and its type."""
        if isinstance(node, (Var, Str)):
            return node, STR
        if isinstance(node, Int):
            return node, INT
        if isinstance(node, Bool):
            return node, BOOL
        if isinstance(node, HashCode):
            operand, t = self.check(node.operand)
            if t != STR:
                raise RuleSyntaxError(f"hashCode() applies to strings, but it is called on "
                                      f"{_ARTICLE[t]}", node.pos)
            if isinstance(operand, Str):
                return Int(node.start, java_hash(operand.value)), INT
            return HashCode(node.start, node.pos, operand), INT
        if isinstance(node, Not):
            operand, t = self.check(node.operand)
            if t != BOOL:
                raise RuleSyntaxError(
                    f"'not' needs a condition, but its operand is {_ARTICLE[t]} ('not' binds "
                    "tighter than comparisons: write not (... == ...))", node.start)
            return Not(node.start, operand), BOOL
        if isinstance(node, Matches):
            operand, t = self.check(node.operand)
            if t != STR:
                raise RuleSyntaxError(f"'matches' applies to strings, but its left operand is "
                                      f"{_ARTICLE[t]}", node.operand.start)
            return Matches(node.start, node.pos, operand, node.pattern), BOOL
        if isinstance(node, Binary):
            left, lt = self.check(node.left)
            right, rt = self.check(node.right)
            op = node.op
            if op == "%":
                for side, sub, t in (("left", node.left, lt), ("right", node.right, rt)):
                    if t != INT:
                        hint = " (use .hashCode() to turn a string into an integer)" if t == STR else ""
                        raise RuleSyntaxError(f"'%' needs integers, but its {side} operand is "
                                              f"{_ARTICLE[t]}{hint}", sub.start)
                if isinstance(right, Int) and right.value == 0:
                    raise RuleSyntaxError("modulo by zero", node.right.start)
                if isinstance(left, Int) and isinstance(right, Int):
                    return Int(node.start, java_mod(left.value, right.value)), INT
                return Binary(node.start, node.pos, op, left, right), INT
            if op in ("and", "or"):
                for side, sub, t in (("left", node.left, lt), ("right", node.right, rt)):
                    if t != BOOL:
                        raise RuleSyntaxError(f"'{op}' needs conditions on both sides, but its "
                                              f"{side} operand is {_ARTICLE[t]}", sub.start)
                return Binary(node.start, node.pos, op, left, right), BOOL
            if op in ("==", "!="):
                for side, sub, t in (("left", node.left, lt), ("right", node.right, rt)):
                    if t == BOOL:
                        raise RuleSyntaxError(f"'{op}' compares strings or integers, but its "
                                              f"{side} operand is a condition", sub.start)
                if lt != rt:
                    raise RuleSyntaxError(f"'{op}' cannot compare {_ARTICLE[lt]} with "
                                          f"{_ARTICLE[rt]}", node.pos)
                return Binary(node.start, node.pos, op, left, right), BOOL
            if op in _INT_CMP:
                for side, sub, t in (("left", node.left, lt), ("right", node.right, rt)):
                    if t != INT:
                        hint = " (use .hashCode() to turn a string into an integer)" if t == STR else ""
                        raise RuleSyntaxError(f"'{op}' compares integers, but its {side} operand is "
                                              f"{_ARTICLE[t]}{hint}", sub.start)
                return Binary(node.start, node.pos, op, left, right), BOOL
        raise AssertionError(f"unknown node {node!r}")  # pragma: no cover

    # ---------------------------------------------------------- emission

    def const(self, s: str) -> int:
        idx = self.string_index.get(s)
        if idx is None:
            idx = self.string_index[s] = len(self.strings)
            self.strings.append(s)
        return idx

    def emit(self, op: int, arg: int, effect: int) -> int:
        self.code += (op, arg)
        self.depth += effect
        if self.depth > self.max_depth:
            self.max_depth = self.depth
            if self.depth > _vm.MAX_STACK:
                raise RuleSyntaxError("expression too complex for the evaluator stack", 0)
        return len(self.code) - 2

    def gen(self, node: Node) -> None:
        if isinstance(node, Var):
            op = _vm.OP_HEADER if node.kind == "header" else _vm.OP_BUILTIN
            self.emit(op, self.const(node.name), +1)
        elif isinstance(node, Str):
            self.emit(_vm.OP_STR, self.const(node.value), +1)
        elif isinstance(node, Int):
            self.emit(_vm.OP_INT, node.value, +1)
        elif isinstance(node, Bool):
            self.emit(_vm.OP_BOOL, int(node.value), +1)
        elif isinstance(node, HashCode):
            self.gen(node.operand)
            self.emit(_vm.OP_HASH, 0, 0)
        elif isinstance(node, Not):
            self.gen(node.operand)
            self.emit(_vm.OP_NOT, 0, 0)
        elif isinstance(node, Matches):
            self.gen(node.operand)
            self.emit(_vm.OP_MATCH, self.regex(node.pattern), 0)
        elif isinstance(node, Binary):
            if node.op in ("and", "or"):
                # and: if the left side is false, keep it and skip the right side
                self.gen(node.left)
                jump = self.emit(_vm.OP_JUMP_IF_FALSE if node.op == "and" else _vm.OP_JUMP_IF_TRUE,
                                 0, 0)
                self.depth -= 1  # the fall-through path pops the left value
                self.gen(node.right)
                self.code[jump + 1] = len(self.code)
                return
            self.gen(node.left)
            self.gen(node.right)
            if node.op == "%":
                self.emit(_vm.OP_MOD, 0, -1)
            elif node.op in ("==", "!="):
                # operand types were checked equal; an Int node or '%'/hashCode means integers
                ints = _is_int(node.left)
                if node.op == "==":
                    self.emit(_vm.OP_EQ_INT if ints else _vm.OP_EQ_STR, 0, -1)
                else:
                    self.emit(_vm.OP_NE_INT if ints else _vm.OP_NE_STR, 0, -1)
            else:
                self.emit(_INT_CMP[node.op], 0, -1)
        else:  # pragma: no cover
            raise AssertionError(f"unknown node {node!r}")

    def regex(self, pattern: Str) -> int:
        try:
            compiled = re.compile(pattern.value)
        except re.error as exc:
            pos = exc.pos if exc.pos is not None else 0
            offsets = pattern.offsets
            where = offsets[min(pos, len(offsets) - 1)] if offsets else pattern.start
            raise RuleSyntaxError(f"invalid regular expression: {exc.msg}", where) from None
        except (RecursionError, OverflowError, ValueError) as exc:
            raise RuleSyntaxError(f"invalid regular expression: {exc}", pattern.start) from None
        # Evaluated by RE2, in time linear in the header's length: a backtracking engine
        # lets one crafted header stall the gateway (`(a+)+$` doubles its time per
        # character). What RE2 cannot run (backreferences, lookaround) is refused here.
        try:
            compiled = re2.compile(pattern.value, _RE2_OPTIONS)
        except re2.error as exc:
            raise RuleSyntaxError(f"regular expression {pattern.value!r} needs backtracking "
                                  f"(a backreference or lookaround), which rules do not allow: "
                                  f"{exc}", pattern.start) from None
        self.patterns.append(compiled)
        return len(self.patterns) - 1


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the user's 400, not a log line


def _is_int(node: Node) -> bool:
    return isinstance(node, (Int, HashCode)) or (isinstance(node, Binary) and node.op == "%")


def compile_ast(src: str, tree: Node) -> "_vm.Condition":
    c = _Compiler(src)
    folded, t = c.check(tree)
    if t != BOOL:
        hint = " (compare it with ==, != or matches)" if t == STR else " (compare it with ==, <, ...)"
        raise RuleSyntaxError(f"a condition must be true or false, but this is {_ARTICLE[t]}{hint}",
                              tree.start)
    c.gen(folded)
    return _vm.Condition(src, tuple(c.code), tuple(c.strings), tuple(c.patterns), c.max_depth)


def compile_condition(src: str) -> "_vm.Condition":
    """Parse, type-check and compile one condition; raises RuleSyntaxError."""
    return compile_ast(src, parse(src))


def disassemble(cond: "_vm.Condition") -> list[str]:
    """Readable listing of a compiled condition (for debugging and tests)."""
    out = []
    code = cond.code
    for pc in range(0, len(code), 2):
        op, arg = code[pc], code[pc + 1]
        name = OPNAMES.get(op, f"?{op}")
        if op in (_vm.OP_HEADER, _vm.OP_BUILTIN, _vm.OP_STR):
            out.append(f"{pc:3d} {name} {cond.constants[arg]!r}")
        elif op == _vm.OP_MATCH:
            out.append(f"{pc:3d} {name} {cond.patterns[arg].pattern!r}")
        elif op in (_vm.OP_INT, _vm.OP_BOOL, _vm.OP_JUMP_IF_FALSE, _vm.OP_JUMP_IF_TRUE):
            out.append(f"{pc:3d} {name} {arg}")
        else:
            out.append(f"{pc:3d} {name}")
    return out
