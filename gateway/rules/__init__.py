"""Header rules: ModelArts "custom settings" conditions, compiled for the hot path.

    cond = compile_condition("#HEADER_uid.hashCode() % 100 < 10")
    cond.evaluate({"uid": "42"})                  # headers: lower-cased name -> value

    rules = RuleSet([{"condition": "#HEADER_version == '0.0.1'", "target": "v1",
                      "header_name": "X-Config", "header_value": "A"}])
    rules.match(headers, builtins)                 # index of the first rule that holds, or -1

Conditions are parsed (gateway.rules.parser), type-checked and compiled to a
flat program (gateway.rules.compiler) that csrc/rules/rules.pyx evaluates.
"""
from __future__ import annotations

import re

from gateway._native.rules import OP_BUILTIN, OP_HEADER, Condition, ConditionSet, java_hash
from gateway.rules.compiler import compile_condition, disassemble
from gateway.rules.parser import BUILTINS, RuleSyntaxError, parse

__all__ = ["BUILTINS", "Condition", "RuleSet", "RuleSyntaxError", "compile_condition", "disassemble",
           "java_hash", "parse", "MAX_RULES", "MAX_HEADER_NAME", "MAX_HEADER_VALUE"]

MAX_RULES = 10
MAX_HEADER_NAME = 128
MAX_HEADER_VALUE = 256

_RULE_KEYS = ("condition", "target", "header_name", "header_value")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")   # RFC 9110 field-name
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class RuleSet(ConditionSet):
    """Up to 10 ordered rules; the first whose condition holds wins.

    Each rule is a dict {"condition": str, "target": str, "header_name": str|None,
    "header_value": str|None}. Everything is validated and compiled here: bad
    conditions raise RuleSyntaxError naming the rule index, other problems
    ValueError naming the rule and the field.

    match(headers, builtins=None) -> int is the compiled ConditionSet.match:
    headers maps lower-cased header names to values.
    """

    def __init__(self, rules):
        if isinstance(rules, (str, bytes, dict)) or not hasattr(rules, "__iter__"):
            raise ValueError("rules must be a list of rule dicts")
        rules = list(rules)
        if len(rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} rules are allowed, got {len(rules)}")
        normalized, conditions = [], []
        for i, rule in enumerate(rules):
            rule = _normalize(i, rule)
            try:
                cond = compile_condition(rule["condition"])
            except RuleSyntaxError as exc:
                raise RuleSyntaxError(exc.message, exc.position, rule_index=i) from None
            normalized.append(rule)
            conditions.append(cond)
        self._rules = tuple(normalized)
        self._targets = tuple(r["target"] for r in normalized)
        self.conditions = tuple(conditions)
        self._set_conditions(conditions)
        names, builtins = [], {}
        for index, cond in enumerate(conditions):
            code = cond.code
            for i in range(0, len(code), 2):
                if code[i] == OP_HEADER and cond.constants[code[i + 1]] not in names:
                    names.append(cond.constants[code[i + 1]])
                elif code[i] == OP_BUILTIN:
                    builtins.setdefault(index, cond.constants[code[i + 1]])
        self.header_names = tuple(names)  # lower-cased: the headers the conditions read
        self.builtin_uses = builtins      # rule index -> a built-in it reads (#USER_NAME...)

    @property
    def rules(self) -> list[dict]:
        """The normalized rules (copies): all four keys present."""
        return [dict(r) for r in self._rules]

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({self.rules!r})"

    def __eq__(self, other):
        return isinstance(other, RuleSet) and self._rules == other._rules

    __hash__ = None

    def __reduce__(self):
        return (RuleSet, (self.rules,))


def _normalize(i: int, rule) -> dict:
    if not isinstance(rule, dict):
        raise ValueError(f"rule {i}: must be a dict with keys {', '.join(_RULE_KEYS)}")
    unknown = sorted(set(rule) - set(_RULE_KEYS), key=str)
    if unknown:
        raise ValueError(f"rule {i}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(_RULE_KEYS)}")
    cond = rule.get("condition")
    if not isinstance(cond, str) or not cond.strip():
        raise ValueError(f"rule {i}: condition must be a non-empty string")
    target = rule.get("target")
    if not isinstance(target, str) or not target:
        raise ValueError(f"rule {i}: target must be a non-empty string")
    name, value = rule.get("header_name"), rule.get("header_value")
    for field, val, limit in (("header_name", name, MAX_HEADER_NAME),
                              ("header_value", value, MAX_HEADER_VALUE)):
        if val is None:
            continue
        if not isinstance(val, str):
            raise ValueError(f"rule {i}: {field} must be a string or None, "
                             f"not {type(val).__name__}")
        if len(val) > limit:
            raise ValueError(f"rule {i}: {field} is {len(val)} characters long; "
                             f"at most {limit} are allowed")
    if name == "":
        name = None
    if name is None:
        if value:
            raise ValueError(f"rule {i}: header_value is set but header_name is not")
        value = None
    else:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"rule {i}: header_name {name!r} is not a valid HTTP header name")
        if value is None:
            value = ""
        if _BAD_VALUE.search(value):
            raise ValueError(f"rule {i}: header_value must not contain CR, LF or NUL")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"rule {i}: header_value must be ISO-8859-1 text (HTTP header "
                             f"values cannot carry {value!r} as it is)") from None
    return {"condition": cond, "target": target, "header_name": name, "header_value": value}
