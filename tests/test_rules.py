"""Header-rule expression language: parser, compiler and the native evaluator."""
import math
import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._native import rules as VM
from gateway.rules import (Condition, RuleSet, RuleSyntaxError, compile_condition, disassemble,
                           java_hash, parse)
from gateway.rules import compiler as C

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------ references

def ref_hash(s: str) -> int:
    """Java String.hashCode, straight from its definition."""
    data = s.encode("utf-16-be", "surrogatepass")
    units = [int.from_bytes(data[k:k + 2], "big") for k in range(0, len(data), 2)]
    n = len(units)
    h = sum(u * 31 ** (n - 1 - k) for k, u in enumerate(units)) % 2 ** 32
    return h - 2 ** 32 if h >= 2 ** 31 else h


def ref_mod(a: int, b: int) -> int:
    """Java '%': a - b * trunc(a / b)."""
    q = abs(a) // abs(b)
    if (a < 0) != (b < 0):
        q = -q
    return a - b * q


def holds(expr, headers=None, builtins=None) -> bool:
    return compile_condition(expr).evaluate(headers or {}, builtins)


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)  # includes surrogates


# ------------------------------------------------------------ hashCode

@pytest.mark.parametrize("s, h", [("", 0), ("a", 97), ("abc", 96354),
                                  ("polygenelubricants", -2147483648), ("Aa", 2112), ("BB", 2112),
                                  ("\U0001F600", 1772899), ("é", 233), ("中文", 646394)])
def test_hashcode_known_values(s, h):
    assert ref_hash(s) == h
    assert java_hash(s) == h
    assert C.java_hash(s) == h
    assert holds(f"#HEADER_s.hashCode() == {h}", {"s": s})
    assert holds(f"#HEADER_s.hashCode() != {h}", {"s": s}) is False


def test_hashcode_collision_and_literal_folding():
    assert holds("#HEADER_a.hashCode() == #HEADER_b.hashCode()", {"a": "Aa", "b": "BB"})
    assert holds("'Aa'.hashCode() == 'BB'.hashCode()")
    assert holds("'polygenelubricants'.hashCode() == -2147483648")
    # a literal's hashCode is folded at compile time: no HASH op left
    assert not any("HASH" in line for line in disassemble(compile_condition("'abc'.hashCode() == 96354")))


@SETTINGS
@given(any_text)
def test_hashcode_matches_reference(s):
    h = ref_hash(s)
    assert java_hash(s) == h
    assert C.java_hash(s) == h
    assert holds(f"#HEADER_s.hashCode() == {h}", {"s": s})


@SETTINGS
@given(st.text(alphabet=st.characters(min_codepoint=0x10000), min_size=1, max_size=10),
       st.text(max_size=5))
def test_hashcode_non_bmp_uses_surrogate_pairs(astral, prefix):
    s = prefix + astral
    units = s.encode("utf-16-be", "surrogatepass")
    h = 0
    for k in range(0, len(units), 2):
        h = (h * 31 + int.from_bytes(units[k:k + 2], "big")) & 0xFFFFFFFF
    assert java_hash(s) == (h ^ 0x80000000) - 0x80000000
    assert len(units) // 2 > len(s)  # really more code units than code points


# ------------------------------------------------------------ Java '%'

@pytest.mark.parametrize("a, b, r", [(-7, 3, -1), (7, -3, 1), (-7, -3, -1), (7, 3, 1), (0, 5, 0),
                                     (-2147483648, -1, 0), (-2147483648, 100, -48)])
def test_java_remainder_folded(a, b, r):
    assert ref_mod(a, b) == r
    assert C.java_mod(a, b) == r
    assert holds(f"{a} % {b} == {r}")


def test_java_remainder_at_runtime():
    # hashCode('polygenelubricants') == Integer.MIN_VALUE: the C-level INT_MIN % -1 case
    h = {"u": "polygenelubricants"}
    assert holds("#HEADER_u.hashCode() % -1 == 0", h)
    assert holds("#HEADER_u.hashCode() % 100 == -48", h)
    assert holds("#HEADER_u.hashCode() % 100 < 10", h)  # negative remainders are < 10
    assert holds("#HEADER_u.hashCode() % 7 % 3 == -2", h)  # left-assoc: (-2 % 3) == -2
    assert -2147483648 % 7 != ref_mod(-2147483648, 7)  # Python's % differs from Java's here


@SETTINGS
@given(any_text, st.integers(-(2 ** 31), 2 ** 31 - 1).filter(bool))
def test_remainder_matches_reference(s, d):
    r = ref_mod(ref_hash(s), d)
    assert r == int(math.fmod(ref_hash(s), d))
    assert holds(f"#HEADER_s.hashCode() % {d} == {r}", {"s": s})
    assert holds(f"#HEADER_s.hashCode() % {d} != {r}", {"s": s}) is False


def test_runtime_modulo_by_zero_is_false():
    # 'Aa'.hashCode() is not zero but ''.hashCode() is: a runtime zero divisor makes comparisons false
    h = {"a": "Aa", "z": ""}
    assert not holds("#HEADER_a.hashCode() % #HEADER_z.hashCode() == 0", h)
    assert not holds("#HEADER_a.hashCode() % #HEADER_z.hashCode() != 0", h)
    assert holds("#HEADER_a.hashCode() % #HEADER_a.hashCode() == 0", h)


# ------------------------------------------------------------ operators

@pytest.mark.parametrize("expr, headers, expected", [
    ("#HEADER_version == '0.0.1'", {"version": "0.0.1"}, True),
    ("#HEADER_version == '0.0.1'", {"version": "0.0.2"}, False),
    ("#HEADER_version != '0.0.1'", {"version": "0.0.2"}, True),
    ("#HEADER_version != '0.0.1'", {"version": "0.0.1"}, False),
    ("'0.0.1' == #HEADER_version", {"version": "0.0.1"}, True),
    ("#HEADER_a == #HEADER_b", {"a": "x", "b": "x"}, True),
    ("#HEADER_a != #HEADER_b", {"a": "x", "b": "y"}, True),
    ("1 == 1", {}, True), ("1 != 1", {}, False), ("-5 == -5", {}, True),
    ("1 < 2", {}, True), ("2 < 2", {}, False), ("2 <= 2", {}, True), ("3 <= 2", {}, False),
    ("3 > 2", {}, True), ("2 > 2", {}, False), ("2 >= 2", {}, True), ("1 >= 2", {}, False),
    ("#HEADER_n.hashCode() > 96353 and #HEADER_n.hashCode() <= 96354", {"n": "abc"}, True),
    ("#HEADER_t matches 'mock.*'", {"t": "mockabc"}, True),
    ("#HEADER_t matches 'mock.*'", {"t": "mock"}, True),
    ("#HEADER_t matches 'mock.*'", {"t": "amock"}, False),
    ("#HEADER_t matches 'ock'", {"t": "mock"}, False),
    ("#HEADER_t matches 'mo'", {"t": "mock"}, False),
    ("#HEADER_t matches 'a|ab'", {"t": "ab"}, True),       # fullmatch, not match + '$'
    ("#HEADER_t matches '[0-9]+'", {"t": "123\n"}, False),  # '$'-style trailing newline is not ok
    ("#DOMAIN_NAME matches 'op.*'", {}, False),
    ("true", {}, True), ("false", {}, False), ("TRUE and not FALSE", {}, True),
    ("#HEADER_a == 'x' and #HEADER_b == 'y'", {"a": "x", "b": "y"}, True),
    ("#HEADER_a == 'x' and #HEADER_b == 'y'", {"a": "x", "b": "n"}, False),
    ("#HEADER_a == 'x' && #HEADER_b == 'y'", {"a": "x", "b": "y"}, True),
    ("#HEADER_a == 'x' or #HEADER_b == 'y'", {"a": "n", "b": "y"}, True),
    ("#HEADER_a == 'x' || #HEADER_b == 'y'", {"a": "n", "b": "n"}, False),
    ("not (#HEADER_a == 'x')", {"a": "y"}, True),
    ("!(#HEADER_a == 'x')", {"a": "x"}, False),
    ("!!(#HEADER_a == 'x')", {"a": "x"}, True),
    ("not not true", {}, True),
])
def test_operators(expr, headers, expected):
    assert holds(expr, headers) is expected


def test_builtins():
    b = {"DOMAIN_NAME": "User A", "DOMAIN_ID": "d1", "PROJECT_NAME": "p", "PROJECT_ID": "p1",
         "USER_NAME": "opsbot", "USER_ID": "u1"}
    assert holds("#DOMAIN_NAME == 'User A'", {}, b)
    assert holds("#USER_NAME matches 'op.*'", {}, b)
    assert holds("#DOMAIN_ID == 'd1' and #PROJECT_NAME == 'p' and #PROJECT_ID == 'p1' "
                 "and #USER_ID == 'u1'", {}, b)
    assert not holds("#DOMAIN_NAME == 'User A'", {"domain_name": "User A"}, None)
    assert not holds("#HEADER_domain_name == 'User A'", {}, b)  # built-ins are not headers


def test_precedence():
    h = {"a": "x", "b": "n", "c": "n"}
    # and binds tighter than or
    assert holds("#HEADER_a == 'x' or #HEADER_b == 'y' and #HEADER_c == 'z'", h)
    assert not holds("(#HEADER_a == 'x' or #HEADER_b == 'y') and #HEADER_c == 'z'", h)
    assert not holds("#HEADER_b == 'y' and #HEADER_c == 'z' or #HEADER_b == 'q'", h)
    # not binds tighter than and/or
    assert holds("not (#HEADER_b == 'y') and #HEADER_a == 'x'", h)
    assert not holds("not (#HEADER_b == 'y' or #HEADER_a == 'x')", h)
    assert holds("!(#HEADER_a == 'x') || #HEADER_a == 'x' && true", h)
    # % binds tighter than comparisons, and is left-associative
    tree = parse("#HEADER_uid.hashCode() % 100 < 10")
    assert tree.op == "<" and tree.left.op == "%"
    assert holds("17 % 10 % 4 == 3") and holds("17 % (10 % 4) == 1")
    # not binds tighter than comparisons (as in SpEL): negating a bare comparison is a type error
    with pytest.raises(RuleSyntaxError, match="binds tighter"):
        compile_condition("not #HEADER_a == 'x'")


def test_short_circuit_skips_regex():
    cond = compile_condition("#HEADER_a == 'x' and #HEADER_t matches 'a.*'")
    assert any("JUMP_IF_FALSE" in line for line in disassemble(cond))
    assert not cond.evaluate({"a": "n", "t": "abc"})
    assert cond.evaluate({"a": "x", "t": "abc"})


def test_header_names_case_insensitive_and_keywords():
    assert holds("#HEADER_X-User-Id == 'u7'", {"x-user-id": "u7"})
    assert holds("#HEADER_x_user == 'u7'", {"x_user": "u7"})
    assert holds("#HEADER_Version == '1' AND #HEADER_T Matches 'a.*' Or FALSE",
                 {"version": "1", "t": "ab"})
    assert holds("NOT (#HEADER_a == 'b')", {})
    # values are case-sensitive
    assert not holds("#HEADER_a == 'X'", {"a": "x"})


def test_missing_header_semantics():
    assert not holds("#HEADER_x == 'a'", {})
    assert not holds("#HEADER_x != 'a'", {})
    assert holds("not (#HEADER_x == 'a')", {})
    assert holds("not (#HEADER_x != 'a')", {})
    assert not holds("#HEADER_uid.hashCode() % 100 < 10", {})
    assert not holds("#HEADER_uid.hashCode() % 100 >= 10", {})
    assert not holds("#HEADER_x matches '.*'", {})
    assert holds("#HEADER_x matches '.*'", {"x": ""})  # present but empty is not missing
    assert not holds("#HEADER_x == #HEADER_y", {})
    assert not holds("5 % #HEADER_y.hashCode() == 0", {})
    assert not holds("#USER_ID == 'u'", {}, None)
    assert not holds("#USER_ID == 'u'", {}, {})
    assert holds("#HEADER_x == 'a' or true", {})
    assert not holds("#HEADER_x == 'a'", {"x": None})  # None values count as missing
    assert not holds("#HEADER_x == 'a'", None)


def test_header_value_types_and_mappings():
    class Headers:  # any mapping with .get, e.g. a case-insensitive multidict
        def __init__(self, d):
            self.d = d

        def get(self, key, default=None):
            return self.d.get(key, default)

    assert holds("#HEADER_a == 'x'", Headers({"a": "x"}))
    assert not holds("#HEADER_a == 'x'", Headers({}))
    assert holds("#HEADER_a == 'caf\u00e9'", {"a": "caf\u00e9".encode("latin-1")})
    assert holds("#HEADER_a == '5'", {"a": 5})
    cond = compile_condition("#HEADER_a == 'x'")
    with pytest.raises(TypeError):
        cond.evaluate()


def test_quote_escaping():
    assert holds("#HEADER_a == 'it''s'", {"a": "it's"})
    assert holds("#HEADER_a == ''''", {"a": "'"})
    assert holds("#HEADER_a == ''", {"a": ""})
    assert holds("#HEADER_a matches 'it''s.*'", {"a": "it's here"})
    assert holds("#HEADER_a == '#HEADER_b and ( ) == !'", {"a": "#HEADER_b and ( ) == !"})


def test_condition_is_compiled_not_an_ast():
    cond = compile_condition("#HEADER_Uid.hashCode() % 100 < 10 and #HEADER_t matches 'a.*'")
    assert isinstance(cond, Condition) and type(cond).__module__ == "gateway._native.rules"
    assert all(isinstance(x, int) for x in cond.code)
    assert "uid" in cond.constants  # keys are lowered at compile time
    assert all(type(p).__module__.startswith("re2") for p in cond.patterns)  # linear time
    assert cond.source.startswith("#HEADER_Uid")
    assert pickle.loads(pickle.dumps(cond)).evaluate({"uid": "abc", "t": "a"}) == \
        cond.evaluate({"uid": "abc", "t": "a"})


@pytest.mark.parametrize("code, constants", [
    ((VM.OP_HASH, 0), ()),                                  # stack underflow
    ((VM.OP_HEADER, 3, VM.OP_NOT, 0), ("a",)),  # bad constant
    ((VM.OP_INT, 1, VM.OP_HASH, 0), ()),        # hash of an int
    ((VM.OP_BOOL, 1, VM.OP_JUMP_IF_TRUE, 0), ()),  # backwards jump
    ((VM.OP_STR, 0), ("a",)),                                # leaves a string
    ((99, 0), ()),
])
def test_vm_rejects_malformed_programs(code, constants):
    with pytest.raises(ValueError, match="malformed"):
        Condition("x", code, constants, (), 4)


# ------------------------------------------------------------ syntax errors

@pytest.mark.parametrize("expr, position, fragment", [
    ("", 0, "expected an expression"),
    ("   ", 3, "expected an expression"),
    ("#HEADER_testheader matches 5", 27, "expected a string literal after 'matches'"),
    ("#HEADER_t matches #HEADER_u", 18, "expected a string literal after 'matches'"),
    ("#HEADER_a == ", 13, "expected a variable, a string, an integer or '('"),
    ("#HEADER_a = 'x'", 10, "'=='"),
    ("#HEADER_a == 'x", 13, "unterminated string"),
    ("#HEADER_a == 'it''s", 13, "unterminated string"),
    ('#HEADER_a == "x"', 13, "single quotes"),
    ("#FOO == 'x'", 0, "unknown variable '#FOO'"),
    ("#domain_name == 'x'", 0, "unknown variable"),
    ("# == 'x'", 1, "variable name after '#'"),
    ("#HEADER_ == 'x'", 8, "header name"),
    ("(#HEADER_a == 'x'", 17, "expected ')'"),
    ("#HEADER_a == 'x')", 16, "unmatched ')'"),
    ("#HEADER_a.hashcode() % 2 == 1", 10, "expected 'hashCode()'"),
    ("#HEADER_a. == 'x'", 11, "expected 'hashCode()'"),
    ("#HEADER_a.hashCode % 2 == 1", 19, "expected '('"),
    ("#HEADER_a.hashCode( % 2 == 1", 20, "expected ')'"),
    ("1 < 2 < 3", 6, "do not chain"),
    ("#HEADER_a == 'x' matches 'y'", 17, "do not chain"),
    ("#HEADER_a == 'x' and", 20, "expected a variable"),
    ("#HEADER_a == 'x' #HEADER_b", 17, "expected 'and', 'or' or end of input"),
    ("#HEADER_a == 1.5", 13, "only decimal integers"),
    ("#HEADER_a == 0x10", 13, "only decimal integers"),
    ("#HEADER_a.hashCode() == 2147483648", 24, "32-bit"),
    ("#HEADER_a == - 1", 14, "expected a digit after '-'"),
    ("#HEADER_a == 'x' & #HEADER_b == 'y'", 17, "'&&'"),
    ("#HEADER_a == 'x' | #HEADER_b == 'y'", 17, "'||'"),
    ("foo == 'x'", 0, "unexpected name 'foo'"),
    ("#HEADER_a == 'x' $", 17, "unexpected character"),
    ("#HEADER_a == 'x' and ()", 22, "expected a variable"),
    # compile-time errors are RuleSyntaxErrors too, with the position of the culprit
    ("#HEADER_a matches 'a(b'", 20, "invalid regular expression"),
    ("#HEADER_a matches 'it''s('", 24, "invalid regular expression"),
    ("#HEADER_a matches '*'", 19, "invalid regular expression"),
    ("'a' < 3", 0, "'<' compares integers"),
    ("#HEADER_a > 3", 0, ".hashCode()"),
    ("#HEADER_a % 2 == 1", 0, "'%' needs integers"),
    ("'a' and 'b'", 0, "'and' needs conditions"),
    ("#HEADER_a == 'x' or 5", 20, "'or' needs conditions"),
    ("#HEADER_a == 5", 10, "cannot compare a string with an integer"),
    ("(1 < 2) == (2 < 3)", 1, "compares strings or integers"),
    ("#HEADER_a", 0, "must be true or false"),
    ("#HEADER_a.hashCode() % 10", 0, "must be true or false"),
    ("not #HEADER_a == 'x'", 0, "'not' needs a condition"),
    ("5.hashCode() == 1", 1, "hashCode() applies to strings"),
    ("#HEADER_a.hashCode().hashCode() == 1", 20, "hashCode() applies to strings"),
    ("#HEADER_a matches 'x' matches 'y'", 22, "do not chain"),
    ("3 matches 'y'", 0, "'matches' applies to strings"),
    ("#HEADER_a.hashCode() % 0 == 1", 23, "modulo by zero"),
    ("#HEADER_a.hashCode() % (5 % 5) < 1", 24, "modulo by zero"),
    ("#HEADER_a.hashCode() % ''.hashCode() < 1", 23, "modulo by zero"),
    ("(" * 40 + "true" + ")" * 40, 32, "nested too deeply"),
    ("not " * 40 + "true", 128, "nested too deeply"),
])
def test_syntax_errors(expr, position, fragment):
    with pytest.raises(RuleSyntaxError) as info:
        compile_condition(expr)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.position == position, str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"position {position}: ")
    assert pickle.loads(pickle.dumps(err)).position == position


def test_syntax_error_signature():
    err = RuleSyntaxError("expected x", 3)
    assert err.message == "expected x" and err.position == 3 and str(err) == "position 3: expected x"


TOKENS = ["#HEADER_a", "#HEADER_B-c", "#DOMAIN_NAME", "#USER_ID", "#FOO", "#", "'x'", "'it''s'",
          "'", "''", "0", "7", "-3", "2147483648", "1.5", "==", "!=", "<", "<=", ">", ">=", "=",
          "%", "matches", "MATCHES", "'a.*'", "'('", ".hashCode()", ".hashCode", ".", "(", ")",
          "and", "or", "not", "&&", "||", "!", "&", "true", "false", "foo", "\"x\"", "$"]


@SETTINGS
@given(st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=12).flatmap(
        lambda toks: st.lists(st.sampled_from(["", " "]), min_size=len(toks), max_size=len(toks))
        .map(lambda seps: "".join(s + t for s, t in zip(seps, toks)))),
    st.text(max_size=30),
    st.text(alphabet="#HEADER_a'()=!<>%.&| 0123456789-hashCodematchesndort", max_size=40),
))
def test_random_text_only_raises_rule_syntax_error(src):
    try:
        cond = compile_condition(src)
    except RuleSyntaxError as exc:
        assert 0 <= exc.position <= len(src)
        assert str(exc).startswith(f"position {exc.position}: ")
        return
    # whatever compiles evaluates to a bool, with or without headers
    assert cond.evaluate({}) in (True, False)
    assert cond.evaluate({"a": "x", "b-c": "it's"}, {"DOMAIN_NAME": "d", "USER_ID": "u"}) in (True, False)


# ------------------------------------------------------------ differential: random well-typed conditions

HEADERS = ["a", "b", "uid"]
STRINGS = ["", "x", "Aa", "BB", "it's", "mock1", "\U0001F600", "polygenelubricants"]
PATTERNS = ["mock.*", "x", ".*", "[A-Z][a-z]", "ock"]
OR, AND, CMP, MOD, UNARY, ATOM = range(1, 7)


def _quote(s):
    return "'" + s.replace("'", "''") + "'"


def _paren(node, need):
    src, prec, fn = node
    return (f"({src})" if prec < need else src), fn


def _case(name, draw):
    return "".join(c.upper() if draw(st.booleans()) else c for c in name)


@st.composite
def str_expr(draw):
    if draw(st.booleans()):
        name = draw(st.sampled_from(HEADERS))
        return f"#HEADER_{_case(name, draw)}", ATOM, (lambda env, n=name: env[0].get(n))
    if draw(st.integers(0, 4)) == 0:
        return "#USER_ID", ATOM, (lambda env: (env[1] or {}).get("USER_ID"))
    s = draw(st.sampled_from(STRINGS))
    return _quote(s), ATOM, (lambda env: s)


@st.composite
def int_expr(draw, depth=0):
    kind = draw(st.integers(0, 2 if depth < 2 else 1))
    if kind == 0:
        v = draw(st.integers(-(2 ** 31), 2 ** 31 - 1))
        return str(v), ATOM, (lambda env: v)
    if kind == 1:
        src, _, fn = draw(str_expr())
        return f"{src}.hashCode()", ATOM, (lambda env: None if fn(env) is None else ref_hash(fn(env)))
    left = _paren(draw(int_expr(depth + 1)), MOD)
    if draw(st.booleans()):  # runtime divisor: a header's hashCode (may be zero: then missing)
        name = draw(st.sampled_from(HEADERS))
        right = (f"#HEADER_{name}.hashCode()",
                 lambda env: None if env[0].get(name) is None else ref_hash(env[0][name]))
    else:
        d = draw(st.integers(-1000, 1000).filter(bool))
        right = (str(d), lambda env: d)

    def fn(env, lf=left[1], rf=right[1]):
        a, b = lf(env), rf(env)
        return None if a is None or b is None or b == 0 else ref_mod(a, b)
    return f"{left[0]} % {right[0]}", MOD, fn


def _cmp(op, a, b):
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


@st.composite
def bool_expr(draw, depth=0):
    kind = draw(st.integers(0, 6 if depth < 4 else 3))
    if kind == 0:
        l, r = _paren(draw(str_expr()), MOD), _paren(draw(str_expr()), MOD)
        op = draw(st.sampled_from(["==", "!="]))
        fn = (lambda env, op=op, lf=l[1], rf=r[1]:
              lf(env) is not None and rf(env) is not None and _cmp(op, lf(env), rf(env)))
        return f"{l[0]} {op} {r[0]}", CMP, fn
    if kind == 1:
        l, r = _paren(draw(int_expr()), MOD), _paren(draw(int_expr()), MOD)
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        fn = (lambda env, op=op, lf=l[1], rf=r[1]:
              lf(env) is not None and rf(env) is not None and _cmp(op, lf(env), rf(env)))
        return f"{l[0]} {op} {r[0]}", CMP, fn
    if kind == 2:
        l = _paren(draw(str_expr()), MOD)
        pat = draw(st.sampled_from(PATTERNS))
        kw = draw(st.sampled_from(["matches", "MATCHES"]))
        fn = (lambda env, lf=l[1], p=re.compile(pat):
              lf(env) is not None and re.fullmatch(p, lf(env)) is not None)
        return f"{l[0]} {kw} {_quote(pat)}", CMP, fn
    if kind == 3:
        v = draw(st.booleans())
        return ("true" if v else "false"), ATOM, (lambda env: v)
    if kind == 4:
        inner = _paren(draw(bool_expr(depth + 1)), UNARY)
        kw = draw(st.sampled_from(["not ", "!", "NOT "]))
        return f"{kw}{inner[0]}", UNARY, (lambda env, f=inner[1]: not f(env))
    op = "and" if kind == 5 else "or"
    prec = AND if op == "and" else OR
    l = _paren(draw(bool_expr(depth + 1)), prec)
    r = _paren(draw(bool_expr(depth + 1)), prec + 1)
    word = draw(st.sampled_from([op, op.upper(), "&&" if op == "and" else "||"]))
    if op == "and":
        fn = lambda env, lf=l[1], rf=r[1]: lf(env) and rf(env)  # noqa: E731
    else:
        fn = lambda env, lf=l[1], rf=r[1]: lf(env) or rf(env)  # noqa: E731
    return f"{l[0]} {word} {r[0]}", prec, fn


envs = st.tuples(
    st.dictionaries(st.sampled_from(HEADERS), st.sampled_from(STRINGS), max_size=3),
    st.none() | st.fixed_dictionaries({}, optional={"USER_ID": st.sampled_from(STRINGS)}),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bool_expr(), st.lists(envs, min_size=1, max_size=4))
def test_compiled_matches_reference_semantics(expr, env_list):
    src, _, fn = expr
    cond = compile_condition(src)
    for env in env_list:
        assert cond.evaluate(env[0], env[1]) is bool(fn(env)), (src, env, disassemble(cond))


# ------------------------------------------------------------ RuleSet

def rule(cond, target, name=None, value=None):
    return {"condition": cond, "target": target, "header_name": name, "header_value": value}


def test_ruleset_first_match_wins():
    rs = RuleSet([
        rule("#HEADER_version == '0.0.1'", "v1", "X-Config", "A"),
        rule("#HEADER_testheader matches 'mock.*'", "v2"),
        rule("#HEADER_uid.hashCode() % 100 < 10", "v3"),
        rule("true", "v4"),
    ])
    assert rs.match({"version": "0.0.1", "testheader": "mockx"}) == 0
    assert rs.match({"version": "0.0.2", "testheader": "mockx"}) == 1
    assert rs.match({"uid": "polygenelubricants"}) == 2
    assert rs.match({"uid": "abc"}) == 3
    assert rs.targets == ["v1", "v2", "v3", "v4"]
    assert rs.rules[0] == rule("#HEADER_version == '0.0.1'", "v1", "X-Config", "A")
    assert len(rs) == 4
    assert RuleSet([rule("false", "v")]).match({}) == -1
    assert RuleSet([]).match({"a": "b"}) == -1
    rs2 = pickle.loads(pickle.dumps(rs))
    assert rs2 == rs and rs2.match({"uid": "abc"}) == 3


def test_ruleset_builtins_and_normalization():
    rs = RuleSet([{"condition": "#DOMAIN_NAME == 'User A'", "target": "v1"},
                  {"condition": "true", "target": "v2", "header_name": "X-Run", "header_value": None},
                  {"condition": "true", "target": "v3", "header_name": "", "header_value": ""}])
    assert rs.match({}, {"DOMAIN_NAME": "User A"}) == 0
    assert rs.match({}, None) == 1
    assert rs.rules[0] == rule("#DOMAIN_NAME == 'User A'", "v1")
    assert rs.rules[1]["header_value"] == ""
    assert rs.rules[2]["header_name"] is None and rs.rules[2]["header_value"] is None
    rs.rules[0]["target"] = "mutated"
    assert rs.targets[0] == "v1"


def test_ruleset_limits():
    RuleSet([rule("true", f"v{i}") for i in range(10)])
    with pytest.raises(ValueError, match="at most 10 rules"):
        RuleSet([rule("true", f"v{i}") for i in range(11)])
    RuleSet([rule("true", "v", "n" * 128, "v" * 256)])
    with pytest.raises(ValueError, match=r"rule 1: header_name .*at most 128"):
        RuleSet([rule("true", "v"), rule("true", "v", "n" * 129, "x")])
    with pytest.raises(ValueError, match=r"rule 0: header_value .*at most 256"):
        RuleSet([rule("true", "v", "n", "v" * 257)])


@pytest.mark.parametrize("bad, fragment", [
    ({"condition": "true"}, "rule 0: target"),
    ({"condition": "", "target": "v"}, "rule 0: condition"),
    ({"condition": "true", "target": "v", "priority": 1}, "unknown key"),
    ({"condition": "true", "target": "v", "header_value": "x"}, "header_name is not"),
    (rule("true", "v", "X Bad", "x"), "not a valid HTTP header name"),
    (rule("true", "v", "X-Ok", "a\r\nX-Evil: 1"), "CR, LF"),
    (rule("true", "v", 5, "x"), "must be a string"),
    ("true", "must be a dict"),
])
def test_ruleset_rejects_bad_rules(bad, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        RuleSet([bad])


def test_ruleset_condition_errors_name_the_rule():
    with pytest.raises(RuleSyntaxError) as info:
        RuleSet([rule("true", "v1"), rule("true", "v2"), rule("#HEADER_a matches 5", "v3")])
    err = info.value
    assert err.rule_index == 2 and err.position == 18
    assert str(err) == ("rule 2: condition: position 18: expected a string literal after "
                        "'matches', found the integer 5")


@SETTINGS
@given(any_text, st.text(max_size=10))
def test_ruleset_is_deterministic(uid, version):
    conds = [rule("#HEADER_uid.hashCode() % 100 < 10", "canary"),
             rule("#HEADER_version matches '1\\..*'", "v1"),
             rule("#HEADER_uid.hashCode() % 2 == 0", "even")]
    a, b = RuleSet(conds), RuleSet(conds)
    headers = {"uid": uid, "version": version}
    first = a.match(headers)
    assert all(a.match(dict(headers)) == first for _ in range(3))
    assert b.match(headers) == first
    h = ref_hash(uid)
    expected = 0 if ref_mod(h, 100) < 10 else 1 if re.fullmatch(r"1\..*", version) else \
        2 if ref_mod(h, 2) == 0 else -1
    assert first == expected
