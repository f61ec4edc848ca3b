"""ARC-shaped science multiple choice (kind `science_mc`)."""

from __future__ import annotations

import random

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


def make_science_mc(rng: random.Random) -> dict:
    question, correct, distractors = rng.choice(_SCIENCE_TEMPLATES)(rng)
    choices = [correct, *distractors[:3]]
    rng.shuffle(choices)
    return {
        "question": question,
        "choices": {"text": choices, "label": list(_LETTERS)},
        "answerKey": _LETTERS[choices.index(correct)],
    }
