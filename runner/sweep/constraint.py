"""Constraint expressions over a sweep's parameter names (``fast < slow``).

A constraint is parsed with :mod:`ast` and compiled here into a tree of small closures;
user text is never handed to ``eval``, ``exec`` or ``compile``. The whitelist:

- names: the sweep's parameters only;
- literals: numbers, booleans and strings (for ``==``/``!=`` against string parameters);
- arithmetic on numbers: ``+ - * / // % **`` and unary ``- +``;
- comparisons ``< <= > >= == !=``, chained as in Python (``5 <= fast < slow``);
- ``and``, ``or``, ``not``, parentheses;
- calls of ``abs(x)``, ``min(a, b, ...)``, ``max(a, b, ...)``.

The whole expression, and each operand of ``and``/``or``/``not``, must be a test (a
comparison, a boolean operation, a name or a boolean literal), so ``fast - slow`` is
rejected rather than read as "true unless equal".
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.errors import KtrdrRunnerError

MAX_LENGTH = 1_000
MAX_NODES = 300
# Keeps ``fast ** slow`` from building numbers with millions of digits.
MAX_EXPONENT = 100

Evaluator = Callable[[Mapping[str, Any]], Any]

ALLOWED = (
    "a constraint may use parameter names, numbers, strings, + - * / // % **, "
    "comparisons (< <= > >= == !=, chained), and/or/not, parentheses and abs/min/max"
)

_NOT_ALLOWED: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "a subscript",
    ast.Lambda: "a lambda expression",
    ast.IfExp: "a conditional expression (x if c else y)",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.JoinedStr: "an f-string",
    ast.Starred: "a starred argument",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "a slice",
}


class ConstraintError(KtrdrRunnerError, ValueError):
    """A constraint is not allowed, names an unknown parameter, or cannot be evaluated."""

    def __init__(self, expression: str, problem: str) -> None:
        self.expression = expression
        self.problem = problem
        super().__init__(f"constraint {expression!r}: {problem}")


def _power(a: Any, b: Any) -> Any:
    if abs(b) > MAX_EXPONENT:
        raise ArithmeticError(f"exponent {b!r} is larger than {MAX_EXPONENT}")
    return a**b


_BINARY: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", _power),
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_COMPARE_NAMES: dict[type[ast.cmpop], str] = {
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
# name -> (function, fewest arguments, most arguments or None)
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "abs": (abs, 1, 1),
    "min": (min, 2, None),
    "max": (max, 2, None),
}
_TESTS = (ast.Compare, ast.BoolOp, ast.Name)


def _number(value: Any, what: str) -> Any:
    if not isinstance(value, int | float):
        raise TypeError(f"{what} needs numbers, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Constraint:
    """A parsed constraint: :meth:`holds` tells whether a combination satisfies it."""

    expression: str
    #: The parameter names the expression reads, in order of first use.
    names: tuple[str, ...]
    _evaluate: Evaluator = field(repr=False, compare=False)

    def holds(self, combination: Mapping[str, Any]) -> bool:
        """Whether ``combination`` (parameter name to value) satisfies the constraint.

        Raises ConstraintError when the expression cannot be evaluated for it (a division
        by zero, arithmetic on a string, a missing parameter).
        """
        try:
            return bool(self._evaluate(combination))
        except KeyError as exc:
            raise ConstraintError(
                self.expression, f"the combination has no value for {exc.args[0]!r}"
            ) from None
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise ConstraintError(
                self.expression, f"cannot be evaluated for {dict(combination)!r}: {exc}"
            ) from None


class _Compiler:
    def __init__(self, expression: str, known: tuple[str, ...]) -> None:
        self.expression = expression
        self.known = known
        self.used: list[str] = []

    def fail(self, node: ast.AST, problem: str) -> ConstraintError:
        where = f" (at column {node.col_offset + 1})" if hasattr(node, "col_offset") else ""
        return ConstraintError(self.expression, f"{problem}{where}; {ALLOWED}")

    def test(self, node: ast.expr) -> Evaluator:
        """Compile ``node``, which must be a test rather than a bare value."""
        compiled = self.compile(node)  # first: a construct outside the whitelist is named as such
        is_test = isinstance(node, _TESTS) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
        if not is_test and not (isinstance(node, ast.Constant) and isinstance(node.value, bool)):
            raise self.fail(
                node,
                f"{ast.unparse(node)!r} is a value, not a test; compare it (e.g. {ast.unparse(node)} > 0)",
            )
        return compiled

    def compile(self, node: ast.expr) -> Evaluator:
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.BoolOp):
            return self._boolop(node)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node)
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        what = _NOT_ALLOWED.get(type(node), f"a {type(node).__name__} expression")
        raise self.fail(node, f"{what} is not allowed")

    def _constant(self, node: ast.Constant) -> Evaluator:
        value = node.value
        if not isinstance(value, bool | int | float | str):
            raise self.fail(node, f"the literal {value!r} is not allowed")
        return lambda _: value

    def _name(self, node: ast.Name) -> Evaluator:
        name = node.id
        if name not in self.known:
            if name in _FUNCTIONS:
                raise self.fail(node, f"{name!r} is a function: call it, as in {name}(a, b)")
            known = ", ".join(self.known) or "none"
            raise ConstraintError(
                self.expression, f"unknown name {name!r}; the sweep's parameters are: {known}"
            )
        if name not in self.used:
            self.used.append(name)
        return lambda c: c[name]

    def _boolop(self, node: ast.BoolOp) -> Evaluator:
        parts = [self.test(v) for v in node.values]
        if isinstance(node.op, ast.And):

            def all_of(c: Mapping[str, Any]) -> Any:
                result: Any = True
                for part in parts:
                    result = part(c)
                    if not result:
                        return result
                return result

            return all_of

        def any_of(c: Mapping[str, Any]) -> Any:
            result: Any = False
            for part in parts:
                result = part(c)
                if result:
                    return result
            return result

        return any_of

    def _unary(self, node: ast.UnaryOp) -> Evaluator:
        if isinstance(node.op, ast.Not):
            inner = self.test(node.operand)
            return lambda c: not inner(c)
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.USub):
            return lambda c: -_number(operand(c), "unary -")
        if isinstance(node.op, ast.UAdd):
            return lambda c: +_number(operand(c), "unary +")
        raise self.fail(node, "the operator ~ is not allowed")

    def _binop(self, node: ast.BinOp) -> Evaluator:
        entry = _BINARY.get(type(node.op))
        if entry is None:
            raise self.fail(node, f"the operator {type(node.op).__name__} is not allowed")
        symbol, fn = entry
        left, right = self.compile(node.left), self.compile(node.right)
        return lambda c: fn(_number(left(c), symbol), _number(right(c), symbol))

    def _compare(self, node: ast.Compare) -> Evaluator:
        first = self.compile(node.left)
        steps: list[tuple[Callable[[Any, Any], Any], Evaluator]] = []
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            fn = _COMPARE.get(type(op))
            if fn is None:
                raise self.fail(node, f"the operator {_COMPARE_NAMES.get(type(op), '?')!r} is not allowed")
            steps.append((fn, self.compile(comparator)))

        def chain(c: Mapping[str, Any]) -> bool:
            a = first(c)
            for fn, right in steps:
                b = right(c)
                if not fn(a, b):
                    return False
                a = b
            return True

        return chain

    def _call(self, node: ast.Call) -> Evaluator:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name is None or name not in _FUNCTIONS:
            called = name or ast.unparse(node.func)
            raise self.fail(node, f"calling {called!r} is not allowed (only abs, min, max)")
        fn, fewest, most = _FUNCTIONS[name]
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{name}() takes plain positional arguments only")
        if len(node.args) < fewest or (most is not None and len(node.args) > most):
            count = str(fewest) if most == fewest else f"at least {fewest}"
            raise self.fail(node, f"{name}() takes {count} argument(s), got {len(node.args)}")
        args = [self.compile(a) for a in node.args]
        return lambda c: fn(*(_number(a(c), f"{name}()") for a in args))


def parse_constraint(expression: str, names: Iterable[str]) -> Constraint:
    """Parse ``expression`` over the parameter ``names`` into a :class:`Constraint`.

    Raises ConstraintError naming what is wrong: a syntax error, a construct outside the
    whitelist (and where), or an unknown name (listing the known ones).
    """
    text = expression.strip()
    known = tuple(names)
    if not text:
        raise ConstraintError(expression, "is empty")
    if len(text) > MAX_LENGTH:
        raise ConstraintError(text[:40] + "...", f"is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ConstraintError(text, f"is not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise ConstraintError(text, "is nested too deeply") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ConstraintError(text, f"has more than {MAX_NODES} parts; simplify it")
    compiler = _Compiler(text, known)
    evaluate = compiler.test(tree.body)
    return Constraint(expression=text, names=tuple(compiler.used), _evaluate=evaluate)
