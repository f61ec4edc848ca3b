"""Final-answer extraction for GSM8K-style outputs (the paper's zero-shot protocol, App. A).

The prompt asks for the final answer inside `\\boxed{}`; the content of the LAST box wins,
because models often restate intermediate results in earlier boxes or echo the instruction.
When no usable box exists we fall back, in order, to "the answer is X" / "answer: X",
"#### X" (the GSM8K reference format, which fine-tuned models imitate) and finally the last
number in the text. The rule that fired is kept per example so a reader can see how much of
an accuracy figure rests on the weaker fallbacks.

Answers are canonicalised to a short string: a number where one can be read ("1,000.50
dollars" -> "1000.5", "\\frac{3}{4}" -> "0.75", "1/3" stays "1/3" because it has no exact
decimal), otherwise the cleaned text.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

RULES = ("boxed", "answer_is", "hashes", "last_number", "none")

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "answer is" / "answer:" with optional markdown bold around the colon ("**Answer:** 42").
_ANSWER_IS = re.compile(r"\banswer\b\s*(?:\*\*)?\s*(?:is\b\s*:?|:)\s*([^\n]*)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]*)")

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A '-' right after a word character or closing bracket is a hyphen or a subtraction
# ("3-4 apples", "(5)-2"), not the sign of the number that follows.
_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])(?P<sign>[+-]))?(?P<num>{_UNSIGNED})(?:\s*/\s*(?P<den>{_UNSIGNED}))?")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SENTENCE_END = re.compile(r"\.(?!\d)|[;!?]")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` / `\\fbox{...}`, balancing nested braces.

    An unclosed box (generation cut off by the token limit) is ignored rather than guessed.
    """
    contents = []
    for match in _BOX_OPEN.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[start:pos])
                    break
    return contents


def _strip_latex(fragment: str) -> str:
    """Remove the LaTeX and currency decoration that surrounds numbers in model answers."""
    s = fragment.replace("{,}", ",").replace("\u2212", "-")
    for _ in range(3):  # macros nest (\text{\textbf{18}}); three passes cover what models write
        s = _TEXT_MACRO.sub(r"\1", s)
        s = _FRAC.sub(r"(\1)/(\2)", s)
    s = re.sub(r"\(\s*([+-]?[\d.,]+)\s*\)/\(\s*([+-]?[\d.,]+)\s*\)", r"\1/\2", s)
    s = re.sub(r"(?<=\d)\\,(?=\d{3})", "", s)  # 1\,000 is LaTeX's thousands separator
    s = re.sub(r"\\[$%,!;: ]", " ", s)  # \$, \%, thin spaces
    s = re.sub(r"\\(?:left|right|displaystyle|quad|qquad|cdot|times)\b", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\degree", " ", s)
    s = re.sub(r"\\[()\[\]]", " ", s)  # \( \) \[ \] math delimiters
    s = s.replace("$", " ").replace("%", " ").replace("*", " ")
    return re.sub(r"\s+", " ", s).strip()


def _canonical_number(sign: str | None, num: str, den: str | None) -> str | None:
    """The number's canonical text; None for a zero denominator or a runaway digit string.

    A number past Python's int-to-text limit (4,300 digits), which an untuned model can write,
    raises ValueError when printed: it is no answer, so extraction goes on as if it were absent.
    """
    try:
        value = Fraction(Decimal(num.replace(",", "")))
        if den is not None:
            denominator = Fraction(Decimal(den.replace(",", "")))
            if denominator == 0:
                return None
            value /= denominator
        if sign == "-":
            value = -value
        return _format_fraction(value)
    except (ValueError, OverflowError):
        return None


def _format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:  # no finite decimal: keep the exact ratio
        return f"{value.numerator}/{value.denominator}"
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    return format(decimal.normalize(), "f")


def _first_number(fragment: str) -> str | None:
    for match in _NUMBER.finditer(fragment):
        number = _canonical_number(match["sign"], match["num"], match["den"])
        if number is not None:
            return number
    return None


def normalize_answer(fragment: str | None) -> str | None:
    """Canonical form of an answer fragment; None when nothing is left.

    After an '=' only the right-hand side counts ("x = 12" -> "12"); the first number of what
    remains is the answer, so trailing units and words ("18 dollars", "5 cm") drop out.
    Without any number the cleaned text itself is the answer (e.g. a boxed letter).
    """
    if fragment is None:
        return None
    cleaned = _strip_latex(fragment)
    if "=" in cleaned:
        cleaned = cleaned.rsplit("=", 1)[1].strip()
    number = _first_number(cleaned)
    if number is not None:
        return number
    cleaned = cleaned.strip(" .,:;\"'`{}")
    return cleaned or None


def _number_from_tail(tail: str) -> str | None:
    """The number a phrase like "the answer is ..." announces: the first in its sentence."""
    sentence = _SENTENCE_END.split(_strip_latex(tail), maxsplit=1)[0]
    if "=" in sentence:
        sentence = sentence.rsplit("=", 1)[1]
    return _first_number(sentence)


def _from_boxes(text: str) -> str | None:
    # Models often echo the instruction ("within \boxed{}"); an empty box is not an answer.
    for content in reversed(_boxed_contents(text)):
        answer = normalize_answer(content)
        if answer is not None:
            return answer
    return None


def _from_phrase(pattern: re.Pattern, text: str) -> str | None:
    # Fallback phrases only count when they announce a number; otherwise the next rule decides.
    for match in reversed(list(pattern.finditer(text))):
        answer = _number_from_tail(match.group(1))
        if answer is not None:
            return answer
    return None


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER.finditer(_strip_latex(text)))
    for match in reversed(matches):
        number = _canonical_number(match["sign"], match["num"], match["den"])
        if number is not None:
            return number
    return None


def extract_with_rule(text: str | None) -> tuple[str | None, str]:
    """(canonical final answer or None, the rule that produced it: one of RULES)."""
    if not text:
        return None, "none"
    for rule, extract in (
        ("boxed", _from_boxes),
        ("answer_is", lambda t: _from_phrase(_ANSWER_IS, t)),
        ("hashes", lambda t: _from_phrase(_HASHES, t)),
        ("last_number", _last_number),
    ):
        answer = extract(text)
        if answer is not None:
            return answer, rule
    return None, "none"


def extract_final_answer(text: str | None) -> str | None:
    return extract_with_rule(text)[0]


def _as_number(answer: str) -> Fraction | None:
    match = _NUMBER.fullmatch(answer)
    if match is None:
        return None
    canonical = _canonical_number(match["sign"], match["num"], match["den"])
    return None if canonical is None else Fraction(canonical)


def answers_match(pred: str | None, reference: str | None, tol: float = 1e-6) -> bool:
    """Numeric comparison where both sides read as numbers, else case-insensitive text equality.

    The one verdict of every engine (ours, lm-eval's generations, on-policy negatives). A runaway
    digit string from an untuned model is no match: past Python's int-conversion limit (4,300
    digits) it raises ValueError, and a float conversion anywhere would raise OverflowError.
    """
    try:
        pred_norm, ref_norm = normalize_answer(pred), normalize_answer(reference)
        if pred_norm is None or ref_norm is None:
            return False
        pred_num, ref_num = _as_number(pred_norm), _as_number(ref_norm)
    except (OverflowError, ValueError):
        return False
    if pred_num is not None and ref_num is not None:
        # Exact fractions, not floats: a runaway "4000...0" from an untuned model overflows float().
        return abs(pred_num - ref_num) <= max(Fraction(tol), abs(ref_num) * Fraction(1, 10**9))
    return pred_norm.casefold() == ref_norm.casefold()
