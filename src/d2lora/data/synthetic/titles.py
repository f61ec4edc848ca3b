"""Economics abstracts with their titles (kind `titles`), in the arXiv stand-in's schema."""

from __future__ import annotations

import random

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


def make_titles(rng: random.Random) -> dict:
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
