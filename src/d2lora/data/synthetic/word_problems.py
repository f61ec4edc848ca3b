"""GSM8K-shaped word problems (kind `math`) and graded arithmetic (kind `arithmetic`), each with a
worked solution and a wrong one that goes astray at one step."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

NAMES = (
    "Ava",
    "Ben",
    "Carla",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jamal",
    "Kim",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)


@dataclass(frozen=True)
class _Prev:
    """Refers to the result of an earlier step, so an error there propagates."""

    index: int


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}
_WRONG_DELTAS = (-10, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 10)


def _run_plan(plan: list, wrong_at: int | None = None, delta: int = 0) -> tuple[list[str], int] | None:
    """Write out a plan's steps; None where a value turns non-integer or non-positive."""
    values: list[int] = []
    lines: list[str] = []
    for i, (label, op, left, right) in enumerate(plan):
        a = values[left.index] if isinstance(left, _Prev) else left
        b = values[right.index] if isinstance(right, _Prev) else right
        if op == "/" and (b == 0 or a % b):
            return None
        result = _OPS[op](a, b) + (delta if i == wrong_at else 0)
        if result <= 0:
            return None
        values.append(result)
        lines.append(f"Step {i + 1}: " + label.format(expr=f"{a} {op} {b} = {result}") + ".")
    return lines, values[-1]


def _wrong_solution(rng: random.Random, plan: list, answer: int) -> tuple[list[str], int]:
    """One wrong arithmetic step, carried through the later steps to a wrong final answer."""
    for _ in range(12):
        attempt = _run_plan(plan, rng.randrange(len(plan)), rng.choice(_WRONG_DELTAS))
        if attempt is not None and attempt[1] != answer:
            return attempt
    # Erring in the last step always works: nothing is recomputed after it.
    return _run_plan(plan, len(plan) - 1, 1)


def _math_shopping(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    (one_a, many_a), (_, many_b) = rng.sample(_SHOP_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(2, 15), rng.randint(2, 15)
    bill = next(x for x in (20, 50, 100, 200, 500) if x > a * p + b * q)
    question = (
        f"{name} buys {a} {many_a} for ${p} each and {b} {many_b} for ${q} each. {name} pays with "
        f"a ${bill} bill. How much change, in dollars, does {name} get back?"
    )
    plan = [
        (f"The {many_a} cost {{expr}} dollars", "*", a, p),
        (f"The {many_b} cost {{expr}} dollars", "*", b, q),
        ("Together they cost {expr} dollars", "+", _Prev(0), _Prev(1)),
        ("The change is {expr} dollars", "-", bill, _Prev(2)),
    ]
    return question, plan


_SHOP_ITEMS = (
    ("notebook", "notebooks"),
    ("pen", "pens"),
    ("apple", "apples"),
    ("book", "books"),
    ("toy car", "toy cars"),
    ("shirt", "shirts"),
    ("candle", "candles"),
    ("mug", "mugs"),
    ("sandwich", "sandwiches"),
    ("plant", "plants"),
)


def _math_speed(rng: random.Random) -> tuple[str, list]:
    vehicle = rng.choice(("car", "train", "bus", "cyclist", "boat", "truck"))
    v, w = rng.randrange(10, 90, 5), rng.randrange(10, 90, 5)
    t1, t2 = rng.randint(2, 6), rng.randint(2, 6)
    question = (
        f"A {vehicle} travels at {v} miles per hour for {t1} hours and then at {w} miles per hour "
        f"for {t2} hours. How many miles does the {vehicle} travel in total?"
    )
    plan = [
        ("In the first part it travels {expr} miles", "*", v, t1),
        ("In the second part it travels {expr} miles", "*", w, t2),
        ("In total it travels {expr} miles", "+", _Prev(0), _Prev(1)),
    ]
    return question, plan


def _math_sharing(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    friends, each, kept = rng.randint(2, 6), rng.randint(2, 12), rng.randint(1, 9)
    total = friends * each + kept
    morning = rng.randint(1, total - 1)
    question = (
        f"{name} picks {morning} apples in the morning and {total - morning} apples in the "
        f"afternoon. {name} keeps {kept} apples and shares the rest equally among {friends} "
        f"friends. How many apples does each friend get?"
    )
    plan = [
        ("Altogether there are {expr} apples", "+", morning, total - morning),
        ("After keeping some, {expr} apples are left to share", "-", _Prev(0), kept),
        ("Each friend gets {expr} apples", "/", _Prev(1), friends),
    ]
    return question, plan


def _math_ages(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    age, gap, times, years = rng.randint(3, 12), rng.randint(1, 5), rng.randint(2, 3), rng.randint(2, 10)
    question = (
        f"{name} is {age} years old. {name}'s brother is {gap} years older. Their mother is "
        f"{times} times as old as the brother. How old will their mother be in {years} years?"
    )
    plan = [
        ("The brother is {expr} years old", "+", age, gap),
        ("The mother is {expr} years old", "*", _Prev(0), times),
        ("In the future she will be {expr} years old", "+", _Prev(1), years),
    ]
    return question, plan


def _math_farm(rng: random.Random) -> tuple[str, list]:
    rows, trees, apples = rng.randint(2, 9), rng.randint(3, 12), rng.randint(5, 30)
    sold = rng.randint(1, rows * trees * apples - 1)
    fruit = rng.choice(("apple", "pear", "orange", "peach", "lemon"))
    question = (
        f"A farmer has {rows} rows of {fruit} trees with {trees} trees in each row. Each tree gives "
        f"{apples} {fruit}s. The farmer sells {sold} {fruit}s. How many {fruit}s are left?"
    )
    plan = [
        ("There are {expr} trees", "*", rows, trees),
        (f"The trees give {{expr}} {fruit}s", "*", _Prev(0), apples),
        (f"After selling, {{expr}} {fruit}s are left", "-", _Prev(1), sold),
    ]
    return question, plan


def _math_savings(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 40), rng.randint(2, 12)
    spent = rng.randint(1, weekly * weeks - 1)
    thing = rng.choice(("bike", "game", "jacket", "backpack", "concert ticket", "watch"))
    question = (
        f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a {thing}. "
        f"How many dollars does {name} have left?"
    )
    plan = [
        ("The savings are {expr} dollars", "*", weekly, weeks),
        ("After the purchase, {expr} dollars are left", "-", _Prev(0), spent),
    ]
    return question, plan


def _math_teams(rng: random.Random) -> tuple[str, list]:
    classes, size, extra = rng.randint(2, 8), rng.randint(2, 6), rng.randint(1, 9)
    students = size * rng.randint(3, 8)
    question = (
        f"A school has {classes} classes with {students} students each. The students form teams "
        f"of {size}, and {extra} teams of teachers join them. How many teams are there in total?"
    )
    plan = [
        ("There are {expr} students", "*", classes, students),
        ("They form {expr} teams", "/", _Prev(0), size),
        ("With the teachers there are {expr} teams", "+", _Prev(1), extra),
    ]
    return question, plan


_MATH_TEMPLATES = (
    _math_shopping,
    _math_speed,
    _math_sharing,
    _math_ages,
    _math_farm,
    _math_savings,
    _math_teams,
)


def make_math(rng: random.Random) -> dict:
    question, plan = rng.choice(_MATH_TEMPLATES)(rng)
    steps, answer = _run_plan(plan)
    wrong_steps, wrong_answer = _wrong_solution(rng, plan, answer)
    return {
        "question": question,
        "solution_steps": steps,
        "answer": str(answer),
        "wrong_steps": wrong_steps,
        "wrong_answer": str(wrong_answer),
    }


# ----------------------------------------------------------------------------- graded arithmetic
# Problems a 135M model can partly solve (the GSM8K-style `math` kind above stays at 0 % for it),
# in three levels: 1, one operation on single digits, asked bare ("What is 7 times 4?");
# 2, one addition, subtraction or product in a sentence; 3, an addition then a subtraction.
# Rows have the `math` kind's schema plus `level`.

_COUNTABLES = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards")


def _arith_bare(rng: random.Random) -> tuple[str, list]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    op = rng.choice(("+", "-", "*"))
    if op == "-":
        a = a + b
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return f"What is {a} {word} {b}?", [("{expr}", op, a, b)]


def _arith_one_step(rng: random.Random) -> tuple[str, list]:
    name, things = rng.choice(NAMES), rng.choice(_COUNTABLES)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {things}. {name} gets {b} more {things}. How many {things} does {name} have now?"
        return question, [(f"{name} has {{expr}} {things}", "+", a, b)]
    if kind == 1:
        question = (
            f"{name} has {a + b} {things}. {name} gives away {b} {things}. How many {things} does {name} have left?"
        )
        return question, [(f"{name} has {{expr}} {things} left", "-", a + b, b)]
    bags, each = rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} has {bags} bags with {each} {things} in each bag. How many {things} does {name} have?"
    return question, [(f"{name} has {{expr}} {things}", "*", bags, each)]


def _arith_two_steps(rng: random.Random) -> tuple[str, list]:
    name, things = rng.choice(NAMES), rng.choice(_COUNTABLES)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, min(9, a + b - 1))
    question = (
        f"{name} has {a} {things}, gets {b} more and then gives away {c}. How many {things} does {name} have now?"
    )
    plan = [
        (f"After getting more, {name} has {{expr}} {things}", "+", a, b),
        (f"After giving some away, {name} has {{expr}} {things}", "-", _Prev(0), c),
    ]
    return question, plan


_ARITHMETIC_LEVELS = (_arith_bare, _arith_one_step, _arith_two_steps)


def make_arithmetic(rng: random.Random) -> dict:
    level = rng.randrange(len(_ARITHMETIC_LEVELS))
    question, plan = _ARITHMETIC_LEVELS[level](rng)
    steps, answer = _run_plan(plan)
    wrong_steps, wrong_answer = _wrong_solution(rng, plan, answer)
    return {
        "question": question,
        "level": level + 1,
        "solution_steps": steps,
        "answer": str(answer),
        "wrong_steps": wrong_steps,
        "wrong_answer": str(wrong_answer),
    }
