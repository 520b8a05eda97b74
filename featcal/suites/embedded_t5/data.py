"""Synthetic text-to-text tasks of the embedded T5 suite, built in code (no downloads).

Every example is a prompt (space-separated words, natural-language-ish, like FusionBench's
GLUE templates) and a one-word answer. Evaluation tasks answer with a label word (exact
match after greedy generation, as GLUE is scored). The base is pre-trained on *other*,
generic objectives over the same kind of text (span denoising and word-sequence skills:
copying, reversing, sorting, counting, picking words of a category), never on an
evaluation task's prompt or label words as answers.

Generators are pure functions of a ``random.Random``: the same seed gives the same data
on every machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

# --------------------------------------------------------------------------------------
# the lexicon
# --------------------------------------------------------------------------------------
NUMBERS = [str(i) for i in range(20)]
COLORS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "bird", "horse", "fish", "cow", "lion", "mouse"]
FOODS = ["bread", "apple", "rice", "cheese", "soup", "cake", "pasta", "egg"]
POSITIVE = ["good", "great", "nice", "happy", "fun", "lovely", "bright", "calm"]
NEGATIVE = ["bad", "awful", "sad", "boring", "dull", "ugly", "poor", "angry"]
FILLER = ["the", "a", "movie", "was", "and", "very", "day", "film", "story", "really", "quite", "it", "is", "book", "today", "this"]
#: words that make up prompts and label words
PROMPT_WORDS = (
    "are numbers in increasing order ? answer yes or no . which color appears most often list : "
    "does contain count word even odd the sentence given determine sentiment positive negative "
    "is first number larger than last first second of these two about animals food any repeated "
    "copy reverse sort how many times appears appear words that name a an pick from fill blanks text "
    "what , ' in mention an animal later short long kind word comes color"
).split()
LABEL_WORDS = ["none", "yes", "no", "red", "blue", "even", "odd", "positive", "negative", "first", "second", "animals", "food", "higher", "lower"]
SENTINELS = [f"<extra_id_{i}>" for i in range(8)]
SPECIAL = ["<pad>", "</s>", "<unk>"]


def vocabulary() -> list[str]:
    """Every word of the suite, specials first (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2)."""
    words: list[str] = []
    seen = set(SPECIAL)
    for w in NUMBERS + COLORS + ANIMALS + FOODS + POSITIVE + NEGATIVE + FILLER + PROMPT_WORDS + LABEL_WORDS:
        if w not in seen:
            seen.add(w)
            words.append(w)
    return SPECIAL + words + SENTINELS


# --------------------------------------------------------------------------------------
# evaluation tasks: (rng) -> (prompt, label index); label words per task
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextTask:
    name: str
    labels: tuple[str, ...]
    make: Callable[[random.Random], tuple[str, int]]
    description: str

    def example(self, rng: random.Random) -> tuple[str, str, int]:
        prompt, y = self.make(rng)
        return prompt, self.labels[y], y


def _nums(rng: random.Random, k: int) -> list[int]:
    return [rng.randrange(len(NUMBERS)) for _ in range(k)]


def _j(xs) -> str:
    return " ".join(str(x) for x in xs)


def _t_sorted(rng):
    k = rng.randint(4, 7)
    xs = sorted(rng.sample(range(len(NUMBERS)), k))
    y = rng.random() < 0.5
    if not y:  # an unsorted list close to sorted half of the time (one adjacent swap)
        if rng.random() < 0.5:
            i = rng.randrange(k - 1)
            xs[i], xs[i + 1] = xs[i + 1], xs[i]
        else:
            while xs == sorted(xs):
                rng.shuffle(xs)
    return f"are the numbers {_j(xs)} in increasing order ? answer yes or no .", 0 if y else 1


def _t_majority(rng):
    k = rng.choice([5, 7, 9])
    a = rng.randint((k + 1) // 2, k) if rng.random() < 0.5 else rng.randint(0, k // 2)
    xs = ["red"] * a + ["blue"] * (k - a)
    rng.shuffle(xs)
    return f"which color appears most often in the list : {_j(xs)} ? answer red or blue .", 0 if a > k // 2 else 1


def _t_membership(rng):
    k = rng.randint(4, 7)
    xs = rng.sample(range(len(NUMBERS)), k)
    if rng.random() < 0.5:
        q, y = rng.choice(xs), 0
    else:
        q, y = rng.choice([i for i in range(len(NUMBERS)) if i not in xs]), 1
    return f"does the list {_j(xs)} contain the number {q} ? answer yes or no .", y


def _t_parity(rng):
    animal = rng.choice(ANIMALS)
    k = rng.randint(4, 8)
    c = rng.randint(0, min(k, 5))
    others = [w for w in ANIMALS if w != animal]
    xs = [animal] * c + [rng.choice(others) for _ in range(k - c)]
    rng.shuffle(xs)
    return f"count the word {animal} in : {_j(xs)} . is the count even or odd ?", c % 2


def _t_sentiment(rng):
    npos = rng.randint(0, 3)
    nneg = rng.choice([n for n in range(0, 4) if n != npos])
    ws = [rng.choice(POSITIVE) for _ in range(npos)] + [rng.choice(NEGATIVE) for _ in range(nneg)]
    ws += [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    rng.shuffle(ws)
    return f"given the sentence ' {_j(ws)} ' , determine the sentiment . is it positive or negative ?", 0 if npos > nneg else 1


def _t_compare(rng):
    a, b = rng.sample(range(len(NUMBERS)), 2)
    mid = _nums(rng, rng.randint(1, 4))
    return f"is the first number larger than the last number in {_j([a] + mid + [b])} ? answer higher or lower .", 0 if a > b else 1


def _t_topic(rng):
    na = rng.randint(0, 3)
    nf = rng.choice([n for n in range(0, 4) if n != na])
    ws = [rng.choice(ANIMALS) for _ in range(na)] + [rng.choice(FOODS) for _ in range(nf)]
    ws += [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
    rng.shuffle(ws)
    return f"is the text ' {_j(ws)} ' about animals or food ?", 0 if na > nf else 1


def _t_repeat(rng):
    k = rng.randint(4, 7)
    xs = rng.sample(range(len(NUMBERS)), k)
    y = rng.random() < 0.5
    if y:
        i, j = rng.sample(range(k), 2)
        xs[j] = xs[i]
    return f"is any number repeated in {_j(xs)} ? answer yes or no .", 0 if y else 1


def _t_first_of_two(rng):
    # which of two colours comes first in the list
    xs = [rng.choice(COLORS) for _ in range(rng.randint(3, 6))]
    xs[rng.randrange(len(xs))] = rng.choice(["red", "blue"])
    first = next((w for w in xs if w in ("red", "blue")))
    return f"which of these two appears first : red or blue ? list : {_j(xs)} .", 0 if first == "red" else 1


def _t_mention(rng):
    k = rng.randint(3, 7)
    ws = [rng.choice(FOODS + COLORS + FILLER) for _ in range(k)]
    y = rng.random() < 0.5
    if y:
        ws[rng.randrange(k)] = rng.choice(ANIMALS)
    return f"does the text ' {_j(ws)} ' mention an animal ? answer yes or no .", 0 if y else 1


def _t_last_number(rng):
    xs = _nums(rng, rng.randint(2, 6))
    xs[-1] = rng.choice([i for i in range(len(NUMBERS)) if i != 10])
    return f"is the last number in the list {_j(xs)} higher or lower than 10 ?", 0 if xs[-1] > 10 else 1


def _t_length(rng):
    y = rng.random() < 0.5
    k = rng.randint(2, 4) if y else rng.randint(7, 9)
    ws = [rng.choice(COLORS + ANIMALS + FOODS) for _ in range(k)]
    return f"is the list {_j(ws)} short or long ?", 0 if y else 1


def _t_first_repeated(rng):
    k = rng.randint(4, 7)
    ws = rng.sample(ANIMALS + FOODS, k)
    y = rng.random() < 0.5
    if y:
        ws[rng.randrange(1, k)] = ws[0]
    return f"is the first word repeated later in ' {_j(ws)} ' ? answer yes or no .", 0 if y else 1



def _t_first_kind(rng):
    k = rng.randint(3, 6)
    ws = [rng.choice(ANIMALS + COLORS + FILLER) for _ in range(k)]
    y = rng.random() < 0.5
    ws[0] = rng.choice(ANIMALS) if y else rng.choice(COLORS)
    return f"what kind of word comes first in ' {_j(ws)} ' ? answer animal or color .", 0 if y else 1


def _t_has_number(rng):
    k = rng.randint(3, 7)
    ws = [rng.choice(COLORS + FOODS + FILLER) for _ in range(k)]
    y = rng.random() < 0.5
    if y:
        ws[rng.randrange(k)] = rng.choice(NUMBERS)
    return f"does the text ' {_j(ws)} ' contain a number ? answer yes or no .", 0 if y else 1


TASKS: dict[str, TextTask] = {
    t.name: t
    for t in [
        TextTask("sorted", ("yes", "no"), _t_sorted, "is a list of numbers increasing (yes/no)"),
        TextTask("majority", ("red", "blue"), _t_majority, "the more frequent of two colours (red/blue)"),
        TextTask("membership", ("yes", "no"), _t_membership, "does a list contain a number (yes/no)"),
        TextTask("parity", ("even", "odd"), _t_parity, "parity of a word's count (even/odd)"),
        TextTask("sentiment", ("positive", "negative"), _t_sentiment, "lexicon sentiment (positive/negative)"),
        TextTask("compare", ("higher", "lower"), _t_compare, "first number vs last number (higher/lower)"),
        TextTask("topic", ("animals", "food"), _t_topic, "animals vs food words (animals/food)"),
        TextTask("repeat", ("yes", "no"), _t_repeat, "is a number repeated (yes/no)"),
        TextTask("mention", ("yes", "no"), _t_mention, "does a text mention an animal (yes/no)"),
        TextTask("last_number", ("higher", "lower"), _t_last_number, "last number vs 10 (higher/lower)"),
        TextTask("length", ("short", "long"), _t_length, "a list of 2-4 vs 7-9 words (short/long)"),
        TextTask("first_repeated", ("yes", "no"), _t_first_repeated, "does the first word occur again (yes/no)"),
        TextTask("first_kind", ("animal", "color"), _t_first_kind, "is the first word an animal or a colour (animal/color)"),
        TextTask("has_number", ("yes", "no"), _t_has_number, "does a text contain a number (yes/no)"),
        TextTask("first_color", ("red", "blue"), _t_first_of_two, "which of red/blue comes first (red/blue)"),
    ]
}

DEFAULT_TASKS = ("sentiment", "topic", "majority", "mention", "first_color", "first_kind", "length", "has_number")


# --------------------------------------------------------------------------------------
# generic pre-training: (rng) -> (input, target) text pairs
# --------------------------------------------------------------------------------------
def _random_text(rng: random.Random) -> list[str]:
    kind = rng.randrange(4)
    k = rng.randint(3, 8)
    if kind == 0:
        return [str(x) for x in _nums(rng, k)]
    if kind == 1:
        return [rng.choice(COLORS) for _ in range(k)]
    if kind == 2:
        return [rng.choice(ANIMALS + FOODS) for _ in range(k)]
    return [rng.choice(POSITIVE + NEGATIVE + FILLER) for _ in range(k)]


def _p_denoise(rng):
    ws = _random_text(rng) + _random_text(rng)
    n_spans = rng.randint(1, min(3, len(ws) // 3))
    starts = sorted(rng.sample(range(len(ws)), n_spans))
    inp, tgt, pos = [], [], 0
    for s_i, s in enumerate(starts):
        if s < pos:
            continue
        ln = rng.randint(1, 2)
        inp += ws[pos:s] + [SENTINELS[s_i]]
        tgt += [SENTINELS[s_i]] + ws[s: s + ln]
        pos = s + ln
    inp += ws[pos:]
    return "fill the blanks : " + _j(inp), _j(tgt)


def _p_copy(rng):
    ws = _random_text(rng)
    return "copy : " + _j(ws), _j(ws)


def _p_reverse(rng):
    ws = _random_text(rng)
    return "reverse : " + _j(ws), _j(ws[::-1])


def _p_sort(rng):
    xs = _nums(rng, rng.randint(3, 7))
    return "sort : " + _j(xs), _j(sorted(xs))


def _p_count(rng):
    ws = _random_text(rng)
    w = rng.choice(ws) if rng.random() < 0.8 else rng.choice(COLORS + ANIMALS)
    return f"how many times does {w} appear in : {_j(ws)} ?", str(ws.count(w))


def _p_pick(rng):
    cat = rng.choice(["animals", "food", "positive", "negative", "numbers"])
    pool = {"animals": ANIMALS, "food": FOODS, "positive": POSITIVE, "negative": NEGATIVE, "numbers": NUMBERS}[cat]
    ws = [rng.choice(ANIMALS + FOODS + POSITIVE + NEGATIVE + NUMBERS[:10]) for _ in range(rng.randint(3, 8))]
    picked = [w for w in ws if w in pool]
    return f"list the words that name {cat} : {_j(ws)}", _j(picked) if picked else "none"


def _p_position(rng):
    ws = _random_text(rng)
    which = rng.choice(["first", "last"])
    return f"what is the {which} word of : {_j(ws)} ?", ws[0] if which == "first" else ws[-1]


PRETRAIN: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "denoise": _p_denoise,
    "copy": _p_copy,
    "reverse": _p_reverse,
    "sort": _p_sort,
    "count": _p_count,
    "pick": _p_pick,
    "position": _p_position,
}
