"""Fuzz the header-rule language: tokenizer and parser (gateway/rules/parser.py),
type checker and compiler (gateway/rules/compiler.py) and the compiled
evaluator (csrc/rules/rules.pyx), on a condition and the headers of a request.

The input is the condition (UTF-8, a config's JSON string), then NUL, then
headers as `name: value` lines (latin-1, as a server hands them over).
Refusal: RuleSyntaxError when the condition is compiled. Invariants: a compiled
condition evaluates to a bool on any headers, a RuleSet of it matches exactly
when it holds, and Java's String.hashCode agrees between the compiled VM and
the compiler's Python.
"""
import sys

import atheris

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.rules import java_hash as native_java_hash
    from gateway.rules import RuleSet, RuleSyntaxError, compile_condition, disassemble
    from gateway.rules.compiler import java_hash

COVERS = ("gateway/rules/parser.py", "gateway/rules/compiler.py", "csrc/rules/rules.pyx",
          "gateway/rules/__init__.py")
BUILTINS = {"USER_NAME": "alice", "PROJECT_ID": "p-1"}


def TestOneInput(data: bytes) -> None:
    source, _, rest = data.partition(b"\0")
    condition = source.decode("utf-8", "replace")
    headers = {}
    for line in rest.decode("latin-1").split("\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    for value in headers.values():
        assert native_java_hash(value) == java_hash(value), value
    try:
        compiled = compile_condition(condition)
    except RuleSyntaxError:
        return
    assert disassemble(compiled)
    holds = compiled.evaluate(headers, BUILTINS)
    assert holds in (True, False)
    if condition.strip():
        assert RuleSet([{"condition": condition, "target": "v1"}]).match(
            headers, BUILTINS) == (0 if holds else -1)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
