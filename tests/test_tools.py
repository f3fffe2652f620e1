"""The calculator tool: nanochat's answers, plain arithmetic, and a battery of hostile inputs that
must all come back None, quickly, without ever reaching eval/exec."""
import inspect
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat_jax import tools
from nanochat_jax.tools import use_calculator


@pytest.mark.parametrize("expression, expected", [
    # nanochat's cases
    ("2+2", 4), ("48/2", 24.0), ("(12*3)-5", 31), ("1,234 + 1", 1235),
    ("'strawberry'.count('r')", 3), ("2**10", 1024),
    # arithmetic
    ("2+3*4", 14), ("(2+3)*4", 20), ("-2**2", -4), ("(-2)**2", 4), ("--3", 3), ("+5 - -5", 10),
    ("7/2", 3.5), ("7//2", 3), ("-7//2", -4), ("7%3", 1), ("-7%3", 2), ("7.5%2", 1.5),
    ("2**-1", 0.5), ("2**0.5", 2**0.5), ("0.1+0.2", 0.1 + 0.2), ("1.5e3*2", 3000.0),
    ("1,000,000 / 4", 250000.0), ("  12 * 12  ", 144), ("10**100", 10**100), ("(" * 150 + "1" + ")" * 150, 1),
    ("2*" * 60 + "1", 2**60),
    # string counting; commas are removed first, inside strings too, as in nanochat
    ("'hello world'.count('o')", 2), ('"banana".count("an")', 2), ("'abc'.count('z')", 0),
    ("'a,b,c'.count('abc')", 1),
])
def test_answers(expression, expected):
    result = use_calculator(expression)
    assert result == expected and type(result) is type(expected)


HOSTILE = [
    # attributes and dunders
    "().__class__", "'a'.__class__.__mro__", "'a'.upper()", "''.__class__.__base__.__subclasses__()",
    "(1).real", "1 .real", "'a'.count", "'a'.count('a').real", "'a'.count.__self__",
    "'a'.count('a').__class__", "''.join('ab')",
    # names, calls, imports
    "x", "__import__('os')", "open('f')", "import os", "__builtins__", "eval('1')", "exec('1')",
    "getattr(1, 'real')", "globals()", "float('inf')", "abs(-1)", "print(1)", "True", "None", "...",
    # oversized work
    "'a'*10**9", "9**9**9", "10**1000", "2**100000", "10**100*10", "1e100**2", "2**101*10**70",
    "1" * 101, "1e309", "-1e309", "1e308*10", "1e100/1e-300", "(-8)**0.5", "1j", "2+3j",
    # the count call, bent
    "'" + "a" * (tools.MAX_STR_CHARS + 1) + "'.count('a')", "'a'.count('" + "a" * 300 + "')",
    "'a'.count('a', 1)", "'a'.count(x='a')", "'a'.count(*'a')", "'a'.count()", "[].count(1)",
    "(1).count(1)", "b'a'.count(b'a')", "'a'.count(b'a')", "'a'.count(1)", "'a'.count('a')+1",
    "'a'.count('a')('x')", "'a'.count('a'.count('a'))", "f'{1}'.count('1')", "'abc'[0]",
    # other syntax
    "lambda: 1", "[x for x in 'ab']", "{x for x in 'ab'}", "(x for x in 'ab')", "f'{1}'", "b'a'",
    "'a'", "'a'+'b'", "'%s' % 1", "'a'*3", "[]", "[1]", "()", "{}", "{1}", "{1: 2}", "1 < 2", "1 == 1",
    "1 and 2", "1 or 2", "not 1", "1 if 1 else 0", "(x := 1)", "~1", "1 << 2", "1 & 1", "1 | 1",
    "1 ^ 1", "1 @ 1", "*1", "1; 2", "1\n2", "1\x00", "", "   ",
    # size limits
    "1+" * 300 + "1", "(" * 10_000 + "1" + ")" * 10_000, "-" * 10_000 + "1", "1" * 10_000,
    "-" * 200 + "1",
    # arithmetic errors
    "1/0", "1//0", "1%0", "0**-1", "1.0/0.0",
]


@pytest.mark.parametrize("expression", HOSTILE)
def test_hostile_input_gives_none(expression):
    assert use_calculator(expression) is None


def test_hostile_inputs_are_fast():
    start = time.perf_counter()
    for expression in HOSTILE:
        assert use_calculator(expression) is None
    assert time.perf_counter() - start < 2.0


def test_parser_limits_are_caught_without_the_length_cap(monkeypatch):
    monkeypatch.setattr(tools, "MAX_INPUT_CHARS", 10**6)  # so the parser itself meets the nesting
    for expression in ["(" * 10_000 + "1" + ")" * 10_000, "-" * 10_000 + "1", "[" * 10_000]:
        assert use_calculator(expression) is None


def test_deadline_is_enforced_without_signals(monkeypatch):
    with ThreadPoolExecutor(4) as pool:  # signal-based timeouts would fail off the main thread
        assert list(pool.map(use_calculator, ["2+2", "3*3", "9**9**9", "1/0"])) == [4, 9, None, None]
    monkeypatch.setattr(tools, "TIME_LIMIT_S", -1.0)
    assert use_calculator("2+2") is None


def test_source_never_calls_eval_or_exec():
    source = inspect.getsource(tools)
    assert not re.search(r"\b(eval|exec|compile)\s*\(", source)
