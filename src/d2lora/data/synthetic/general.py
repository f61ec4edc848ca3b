"""General instructions with a good and a poor answer (kind `general`), the warm-up's stand-in."""

from __future__ import annotations

import random

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


def make_general(rng: random.Random) -> dict:
    prompt, chosen, rejected = rng.choice(_GENERAL_TEMPLATES)(rng)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
