"""The calculator tool the chat model calls between `<|python_start|>` and `<|python_end|>`.

nanochat evaluated the model's text with Python's `eval` behind character filters, which its PR
#165 showed to be a code-execution hole. Here the text is only ever parsed
(`ast.parse(..., mode="eval")`) and the tree is walked against an explicit allow-list:

- number literals (int or float, never bool or complex), unary `+`/`-`, and binary
  `+ - * / // % **`, parenthesised however the parser likes;
- or, as the whole expression, exactly one `'<str>'.count('<str>')` call: two string constants,
  one positional argument.

Anything else (names, other attributes, calls, subscripts, containers, comparisons, f-strings,
bytes, ...), any arithmetic error, and any value whose magnitude passes `MAX_MAGNITUDE` (or that
is inf/nan) gives None. The work is bounded before it is done: the input length caps the parse,
the node count caps the walk (and its recursion depth), magnitudes and exponents are checked before
each operation, so every step is cheap; a wall-clock deadline checked at each node backs this up
without signals, so the tool is safe to call from any thread. As in nanochat, commas are removed
first (`1,234` is 1234, also inside strings) and results are Python's own (`48/2` is 24.0).
"""
import ast
import itertools
import math
import operator
import time

MAX_INPUT_CHARS = 500    # after comma removal
MAX_NODES = 256          # AST nodes; also bounds the walk's recursion depth to ~128
MAX_STR_CHARS = 256      # each string of a `.count` call
MAX_EXPONENT = 100       # |e| in b ** e
MAX_MAGNITUDE = 10**100  # any literal, intermediate or result beyond this is refused
TIME_LIMIT_S = 1.0       # wall clock for one call

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression is outside the allow-list or its bounds."""


def use_calculator(expression: str) -> int | float | None:
    """Value of a calculator expression, or None when it is refused or fails (see module doc)."""
    deadline = time.monotonic() + TIME_LIMIT_S
    text = expression.replace(",", "").strip()  # ast.parse rejects a leading blank as an indent
    if len(text) > MAX_INPUT_CHARS:
        return None
    try:
        tree = ast.parse(text, mode="eval")
        if sum(1 for _ in itertools.islice(ast.walk(tree), MAX_NODES + 1)) > MAX_NODES:
            return None
        if _is_count_call(tree.body):
            return tree.body.func.value.value.count(tree.body.args[0].value)
        return _evaluate(tree.body, deadline)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


def _is_count_call(node: ast.expr) -> bool:
    """`'<str>'.count('<str>')` with both strings within MAX_STR_CHARS, and nothing more."""
    return (isinstance(node, ast.Call) and not node.keywords and len(node.args) == 1
            and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and all(isinstance(s, ast.Constant) and type(s.value) is str
                    and len(s.value) <= MAX_STR_CHARS for s in (node.func.value, node.args[0])))


def _evaluate(node: ast.expr, deadline: float) -> int | float:
    """Arithmetic over the allow-list; every operand and result is a checked, bounded number."""
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Constant):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand, deadline)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, deadline), _evaluate(node.right, deadline)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    raise _Refused(type(node).__name__)


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse b ** e before computing it when |e| or the result's magnitude would be too large."""
    if abs(exponent) > MAX_EXPONENT:
        raise _Refused("exponent")
    if base != 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise _Refused("power too large")


def _checked(value: object) -> int | float:
    """`value` if it is a finite int or float within MAX_MAGNITUDE (bool and complex are refused)."""
    if type(value) not in (int, float):
        raise _Refused(type(value).__name__)
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
        raise _Refused("magnitude")
    return value
