"""Deterministic synthetic stand-ins for the real data sets, in their sources' raw schemas.

They let the whole pipeline run (and be tested) with no download: each kind yields rows shaped
like the data set it stands in for, so the same raw → canonical mapping code runs on both.

Train and eval are disjoint by construction: a row's key text (question, abstract or prompt)
is hashed, and the hash alone decides which split may hold it. That holds for any seed and any
row count, so no split has to be generated to filter the other.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "eval")
EVAL_SHARE = 5  # one key text in EVAL_SHARE belongs to eval, the rest to train

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


def split_of(text: str) -> str:
    """The split a key text belongs to; hashlib, not hash(), so it is stable across processes."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % EVAL_SHARE
    return "eval" if bucket == 0 else "train"


# ----------------------------------------------------------------------------- math


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


def _make_math(rng: random.Random) -> dict:
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


def _make_arithmetic(rng: random.Random) -> dict:
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


# ----------------------------------------------------------------------------- titles

_DRIVERS = (
    "minimum wage increases",
    "trade liberalization",
    "microfinance access",
    "remittance inflows",
    "carbon taxes",
    "central bank independence",
    "mobile money adoption",
    "foreign direct investment",
    "public infrastructure spending",
    "financial literacy programs",
    "housing subsidies",
    "immigration",
    "automation",
    "fiscal decentralization",
    "interest rate shocks",
    "tariff reductions",
    "conditional cash transfers",
    "credit constraints",
    "digital payments",
    "land reform",
)
_OUTCOMES = (
    "employment",
    "household consumption",
    "income inequality",
    "firm productivity",
    "inflation",
    "export growth",
    "female labor force participation",
    "poverty",
    "school enrollment",
    "wage growth",
    "energy consumption",
    "housing prices",
    "small business growth",
    "agricultural output",
    "economic growth",
    "household savings",
    "health spending",
    "entrepreneurship",
)
_REGIONS = (
    "Brazil",
    "India",
    "Sub-Saharan Africa",
    "the European Union",
    "Southeast Asia",
    "Latin America",
    "China",
    "the United States",
    "Turkey",
    "Eastern Europe",
    "Mexico",
    "Indonesia",
    "Nigeria",
    "Vietnam",
    "the Middle East",
)
_METHODS = (
    ("a difference-in-differences design", "Difference-in-Differences Evidence"),
    ("an instrumental variables strategy", "Instrumental Variables Evidence"),
    ("a regression discontinuity design", "Regression Discontinuity Evidence"),
    ("a panel vector autoregression", "Panel VAR Evidence"),
    ("a structural gravity model", "Gravity Model Evidence"),
    ("the synthetic control method", "Synthetic Control Evidence"),
    ("a randomized controlled trial", "Experimental Evidence"),
    ("quantile regressions", "Quantile Regression Evidence"),
)
_DATA = (
    "household survey data",
    "firm-level panel data",
    "administrative tax records",
    "census microdata",
    "monthly price data",
    "bank loan records",
    "customs transaction data",
    "satellite night-light data",
    "district-level panel data",
)
_EFFECTS = (
    "a large positive",
    "a small positive",
    "a significant negative",
    "a modest negative",
    "a statistically insignificant",
    "a persistent positive",
    "a short-lived negative",
)
_GROUPS = (
    "low-income households",
    "small firms",
    "rural areas",
    "young workers",
    "women",
    "urban households",
    "exporting firms",
    "informal workers",
)
_POLICIES = (
    "labor market policy",
    "trade policy",
    "monetary policy",
    "financial inclusion",
    "climate policy",
    "social protection programs",
    "development policy",
)
_SMALL_WORDS = {"a", "an", "and", "the", "of", "on", "in", "for", "from", "to"}


def _title_case(text: str) -> str:
    words = text.split(" ")
    return " ".join(w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(words))


def _make_titles(rng: random.Random) -> dict:
    driver, outcome, region = rng.choice(_DRIVERS), rng.choice(_OUTCOMES), rng.choice(_REGIONS)
    method, method_title = rng.choice(_METHODS)
    data, effect, group = rng.choice(_DATA), rng.choice(_EFFECTS), rng.choice(_GROUPS)
    start = rng.randint(1985, 2010)
    end = start + rng.randint(5, 12)
    sentences = [
        rng.choice(
            (
                f"This paper studies the effect of {driver} on {outcome} in {region}.",
                f"We examine how {driver} shapes {outcome} in {region}.",
                f"This study investigates the link between {driver} and {outcome} in {region}.",
            )
        ),
        f"Using {data} covering {start} to {end}, we apply {method}.",
        f"We find {effect} effect of {driver} on {outcome}, with the largest effects among {group}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"The results have implications for {rng.choice(_POLICIES)}.")
    place = region.removeprefix("the ")
    title = rng.choice(
        (
            f"{_title_case(driver)} and {_title_case(outcome)}: {method_title} from {place}",
            f"The Effect of {_title_case(driver)} on {_title_case(outcome)} in {place}",
            f"{_title_case(driver)}, {_title_case(outcome)}, and {_title_case(group)}: Evidence from {place}",
        )
    )
    return {"abstract": " ".join(sentences), "title": title}


# ----------------------------------------------------------------------------- science multiple choice

_ANIMAL_CLASSES = {
    "mammal": ("dog", "whale", "bat", "horse", "dolphin", "elephant", "mouse", "cow", "lion", "rabbit"),
    "bird": ("eagle", "penguin", "owl", "sparrow", "ostrich", "parrot", "duck", "robin"),
    "reptile": ("snake", "lizard", "turtle", "crocodile", "iguana", "gecko"),
    "amphibian": ("frog", "toad", "salamander", "newt"),
    "fish": ("shark", "salmon", "trout", "goldfish", "tuna", "cod"),
    "insect": ("ant", "bee", "butterfly", "beetle", "grasshopper", "mosquito"),
}
_STATES = {
    "solid": ("ice", "a rock", "an iron nail", "a wooden block", "a pencil", "a grain of salt", "a coin"),
    "liquid": ("liquid water", "milk", "orange juice", "vinegar", "olive oil", "honey", "rain"),
    "gas": ("steam", "oxygen", "helium", "carbon dioxide", "water vapor", "nitrogen", "the air in a balloon"),
}
_PLANETS = {
    "Which planet is closest to the Sun?": "Mercury",
    "Which planet is known as the Red Planet?": "Mars",
    "Which planet is the largest in our solar system?": "Jupiter",
    "Which planet has the largest and brightest rings?": "Saturn",
    "On which planet do humans live?": "Earth",
    "Which planet is farthest from the Sun?": "Neptune",
    "Which planet has the hottest surface in our solar system?": "Venus",
    "Which planet spins on its side?": "Uranus",
}
_ORGANS = {
    "pumps blood through the body": "heart",
    "takes in oxygen from the air": "lungs",
    "uses acid to break down food": "stomach",
    "controls thoughts and movement": "brain",
    "filters waste from the blood": "kidneys",
    "absorbs most nutrients from digested food": "small intestine",
    "covers and protects the body": "skin",
    "makes bile": "liver",
}
_FACTS = (
    ("What force pulls objects toward the center of Earth?", "gravity", ("friction", "magnetism", "buoyancy")),
    (
        "What kind of energy does a moving object have?",
        "kinetic energy",
        ("potential energy", "chemical energy", "nuclear energy"),
    ),
    ("Which material is the best conductor of electricity?", "copper", ("wood", "rubber", "plastic")),
    ("Which tool is used to measure temperature?", "thermometer", ("ruler", "balance", "barometer")),
    ("Which tool is used to measure mass?", "balance", ("thermometer", "stopwatch", "ruler")),
    ("What gas do plants take from the air to make food?", "carbon dioxide", ("nitrogen", "helium", "hydrogen")),
    (
        "What happens to liquid water when it is cooled below 0 degrees Celsius?",
        "it freezes",
        ("it boils", "it evaporates", "it condenses"),
    ),
    ("What is the main source of energy for Earth?", "the Sun", ("the Moon", "volcanoes", "the wind")),
    ("Which part of a plant takes in water from the soil?", "roots", ("leaves", "flowers", "seeds")),
    (
        "What causes day and night on Earth?",
        "Earth spinning on its axis",
        ("Earth orbiting the Sun", "the Moon orbiting Earth", "clouds blocking the Sun"),
    ),
)
_UNITS = (
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("centimeters", "millimeters", 10),
)
_MOVERS = {"runner": (6, 15), "cyclist": (10, 30), "boat": (10, 40), "car": (40, 100), "train": (60, 150)}


def _numeric_distractors(rng: random.Random, correct: int, candidates: list[int]) -> list[int]:
    pool = sorted({c for c in candidates if c > 0 and c != correct})
    return rng.sample(pool, 3)


def _sci_animal(rng: random.Random) -> tuple[str, str, list[str]]:
    cls = rng.choice(sorted(_ANIMAL_CLASSES))
    animal = rng.choice(_ANIMAL_CLASSES[cls])
    others = rng.sample([c for c in sorted(_ANIMAL_CLASSES) if c != cls], 3)
    return f"To which group of animals does a {animal} belong?", cls, others


def _sci_state(rng: random.Random) -> tuple[str, str, list[str]]:
    state = rng.choice(sorted(_STATES))
    thing = rng.choice(_STATES[state])
    others = [s for s in ("solid", "liquid", "gas", "plasma") if s != state]
    return f"In which state of matter is {thing}?", state, others


def _sci_planet(rng: random.Random) -> tuple[str, str, list[str]]:
    question = rng.choice(sorted(_PLANETS))
    answer = _PLANETS[question]
    return question, answer, rng.sample(sorted(set(_PLANETS.values()) - {answer}), 3)


def _sci_organ(rng: random.Random) -> tuple[str, str, list[str]]:
    function = rng.choice(sorted(_ORGANS))
    answer = _ORGANS[function]
    return f"Which organ {function}?", answer, rng.sample(sorted(set(_ORGANS.values()) - {answer}), 3)


def _sci_fact(rng: random.Random) -> tuple[str, str, list[str]]:
    question, answer, distractors = rng.choice(_FACTS)
    return question, answer, list(distractors)


def _sci_units(rng: random.Random) -> tuple[str, str, list[str]]:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 999)
    correct = n * factor
    wrong = _numeric_distractors(
        rng, correct, [correct * 10, correct // 10, n + factor, correct + factor, correct - factor]
    )
    return f"How many {small} are in {n} {big}?", str(correct), [str(w) for w in wrong]


def _sci_speed(rng: random.Random) -> tuple[str, str, list[str]]:
    mover = rng.choice(sorted(_MOVERS))
    speed, hours = rng.randint(*_MOVERS[mover]), rng.randint(2, 8)
    unit = rng.choice(("kilometers", "miles"))
    distance = speed * hours
    wrong = _numeric_distractors(
        rng, speed, [distance * hours, distance + hours, distance - hours, speed + hours, speed * 2]
    )
    return (
        f"A {mover} travels {distance} {unit} in {hours} hours. What is its average speed?",
        f"{speed} {unit} per hour",
        [f"{w} {unit} per hour" for w in wrong],
    )


def _sci_force(rng: random.Random) -> tuple[str, str, list[str]]:
    mass, accel = rng.randint(2, 200), rng.randint(2, 20)
    force = mass * accel
    wrong = _numeric_distractors(rng, force, [mass + accel, abs(mass - accel), force * 2, force + mass, force - accel])
    return (
        f"A {mass} kg cart accelerates at {accel} meters per second squared. What net force acts on the cart?",
        f"{force} newtons",
        [f"{w} newtons" for w in wrong],
    )


def _sci_density(rng: random.Random) -> tuple[str, str, list[str]]:
    density, volume = rng.randint(1, 20), rng.randint(2, 100)
    mass = density * volume
    wrong = _numeric_distractors(rng, density, [mass * volume, mass + volume, mass, volume, density + volume])
    unit = "grams per cubic centimeter"
    return (
        f"An object has a mass of {mass} grams and a volume of {volume} cubic centimeters. What is its density?",
        f"{density} {unit}",
        [f"{w} {unit}" for w in wrong],
    )


_SCIENCE_TEMPLATES = (
    _sci_animal,
    _sci_state,
    _sci_planet,
    _sci_organ,
    _sci_fact,
    _sci_units,
    _sci_speed,
    _sci_force,
    _sci_density,
)
_LETTERS = ("A", "B", "C", "D")


def _make_science_mc(rng: random.Random) -> dict:
    question, correct, distractors = rng.choice(_SCIENCE_TEMPLATES)(rng)
    choices = [correct, *distractors[:3]]
    rng.shuffle(choices)
    return {
        "question": question,
        "choices": {"text": choices, "label": list(_LETTERS)},
        "answerKey": _LETTERS[choices.index(correct)],
    }


# ----------------------------------------------------------------------------- general instructions

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 10,000 (American style, no "and")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


_SUBJECTS = (
    "The cat",
    "My neighbor",
    "A young scientist",
    "The old train",
    "Our teacher",
    "The small bird",
    "A busy farmer",
    "The red kite",
    "My sister",
    "The river",
)
_VERBS = ("watches", "follows", "paints", "finds", "carries", "visits", "remembers", "crosses")
_OBJECTS = (
    "the quiet harbor",
    "a green bottle",
    "the morning market",
    "an old map",
    "the tall bridge",
    "a wooden box",
    "the school garden",
    "a paper lantern",
    "the city park",
)
_CATEGORIES = {
    "fruits": ("apple", "banana", "mango", "cherry", "grape", "pear", "plum", "kiwi"),
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    "European capitals": ("Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Oslo", "Prague"),
    "musical instruments": ("piano", "violin", "guitar", "flute", "drum", "trumpet", "cello", "harp"),
    "farm animals": ("cow", "sheep", "goat", "pig", "chicken", "horse", "duck", "donkey"),
    "vegetables": ("carrot", "potato", "onion", "spinach", "pepper", "broccoli", "pea", "cabbage"),
}
_DEFINITIONS = {
    "generous": "Willing to give more of something, such as money or time, than is expected.",
    "fragile": "Easily broken or damaged.",
    "ancient": "Belonging to the very distant past.",
    "humid": "Having a lot of water vapor in the air.",
    "reluctant": "Unwilling and hesitant to do something.",
    "vivid": "Producing strong, clear images in the mind; bright and intense.",
    "abundant": "Existing in large quantities; more than enough.",
    "brief": "Lasting only a short time.",
    "curious": "Eager to know or learn something.",
    "fertile": "Able to produce abundant crops or offspring.",
    "transparent": "Allowing light to pass through so that objects behind can be seen clearly.",
    "rigid": "Stiff and unable to bend.",
}
_EXPLANATIONS = {
    "the sky looks blue on a clear day": "Air molecules scatter short blue wavelengths of sunlight much more "
    "than longer red ones, so blue light reaches our eyes from every direction of the sky.",
    "ice floats on water": "Water expands when it freezes, so ice is less dense than liquid water and is "
    "pushed up by buoyancy.",
    "metal feels colder than wood at the same temperature": "Metal conducts heat away from the skin much "
    "faster than wood, so the skin cools more quickly when touching it.",
    "we have seasons on Earth": "Earth's axis is tilted, so each hemisphere receives more direct sunlight "
    "for part of the year and less for the other part.",
    "bread rises when it is baked": "Yeast produces carbon dioxide gas that is trapped in the dough and "
    "expands when heated, making the bread rise.",
    "leaves are green": "Leaves contain chlorophyll, which absorbs red and blue light and reflects green light.",
    "a spoon looks bent in a glass of water": "Light changes direction when it passes between water and "
    "air, so the part of the spoon under water appears shifted.",
    "sweating cools the body": "Sweat takes heat from the skin as it evaporates, lowering the body's temperature.",
}
_POOR_ANSWERS = ("I am not sure.", "That is a good question.", "Please ask something else.", "Yes.")


def _gen_number_words(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 9999)
    wrong = number_words(max(0, n + rng.choice((-100, -10, -1, 1, 10, 100))))
    return f"Write the number {n} in words.", number_words(n), rng.choice((wrong, f"The number {n}."))


def _gen_sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    ordered = sorted(numbers)
    rejected = rng.choice((ordered[::-1], numbers if numbers != ordered else ordered[::-1]))
    return (
        f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
        ", ".join(map(str, ordered)),
        ", ".join(map(str, rejected)),
    )


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _gen_uppercase(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    return (
        f"Rewrite this sentence in capital letters: {sentence}",
        sentence.upper(),
        rng.choice((sentence, sentence.lower())),
    )


def _gen_list(rng: random.Random) -> tuple[str, str, str]:
    category, other = rng.sample(sorted(_CATEGORIES), 2)
    k = rng.randint(2, 5)
    listing = lambda items: "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))  # noqa: E731
    rejected = rng.choice((listing(rng.sample(_CATEGORIES[other], k)), rng.choice(_POOR_ANSWERS)))
    return f"List {k} {category}.", listing(rng.sample(_CATEGORIES[category], k)), rejected


def _gen_define(rng: random.Random) -> tuple[str, str, str]:
    word, other = rng.sample(sorted(_DEFINITIONS), 2)
    prompt = rng.choice((f'Define the word "{word}".', f'What does the word "{word}" mean?'))
    return prompt, _DEFINITIONS[word], _DEFINITIONS[other]


def _gen_explain(rng: random.Random) -> tuple[str, str, str]:
    topic, other = rng.sample(sorted(_EXPLANATIONS), 2)
    rejected = rng.choice((_EXPLANATIONS[other], rng.choice(_POOR_ANSWERS)))
    return f"Explain briefly why {topic}.", _EXPLANATIONS[topic], rejected


def _gen_arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    word, result = rng.choice((("plus", a + b), ("times", a * b)))
    wrong = result + rng.choice((-10, -1, 1, 10))
    return f"What is {a} {word} {b}?", f"{a} {word} {b} equals {result}.", f"{a} {word} {b} equals {wrong}."


def _gen_count_words(rng: random.Random) -> tuple[str, str, str]:
    sentence = _sentence(rng)
    count = len(sentence.split())
    wrong = count + rng.choice((-1, 1, 2))
    return (
        f'How many words are in this sentence: "{sentence}"',
        f"The sentence has {count} words.",
        f"The sentence has {wrong} words.",
    )


_GENERAL_TEMPLATES = (
    _gen_number_words,
    _gen_sort,
    _gen_uppercase,
    _gen_list,
    _gen_define,
    _gen_explain,
    _gen_arithmetic,
    _gen_count_words,
)


def _make_general(rng: random.Random) -> dict:
    prompt, chosen, rejected = rng.choice(_GENERAL_TEMPLATES)(rng)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------- entry point

# kind → (row maker, the field whose text must be unique and decides the split)
GENERATORS: dict[str, tuple[Callable[[random.Random], dict], str]] = {
    "math": (_make_math, "question"),
    "arithmetic": (_make_arithmetic, "question"),
    "titles": (_make_titles, "abstract"),
    "science_mc": (_make_science_mc, "question"),
    "general": (_make_general, "prompt"),
}
KINDS = tuple(GENERATORS)


def generate(kind: str, rows: int, seed: int, split: str) -> list[dict]:
    """`rows` distinct rows of `kind` for `split`, identical for identical arguments."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"synthetic rows must be a non-negative int, got {rows!r}")
    make, key = GENERATORS[kind]
    rng = random.Random(f"{seed}-{kind}-{split}")
    out: list[dict] = []
    seen: set[str] = set()
    # Candidates that are duplicates or belong to the other split are drawn and dropped; the
    # budget turns an impossible request into an error instead of an endless loop.
    for _ in range(50 * rows + 1000):
        if len(out) == rows:
            break
        row = make(rng)
        text = row[key]
        if text not in seen and split_of(text) == split:
            seen.add(text)
            out.append(row)
    if len(out) < rows:
        raise ValueError(f"synthetic {kind}: could make only {len(out)} distinct {split} rows, {rows} asked")
    return out
