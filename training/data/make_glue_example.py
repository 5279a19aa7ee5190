#!/usr/bin/env python
"""Writes training/data/glue_example/{train,dev}.tsv: the embedded sentence-classification set (SST-2's layout:
`sentence<TAB>label`, 1 = positive). Run from the repository root; the output is deterministic (seed 0).

Short reviews of products and places built from a grammar in which the label is not a bag of words: a negation
flips an adjective ('not bad' is positive), and in 'X, but Y' the second clause decides. A sentence encoder with a
new (random) head is at chance before training; a fine-tuned one learns the rule from a few hundred examples.
"""
import random
from pathlib import Path

SUBJECTS = ["the movie", "this film", "the hotel room", "our waiter", "the new phone", "this laptop", "the book",
            "the soundtrack", "the pasta", "the customer service", "the sequel", "this game", "the battery",
            "the camera", "the concert", "the plot", "the staff", "the coffee", "the sofa", "the app"]
POSITIVE = ["good", "great", "excellent", "wonderful", "charming", "delightful", "reliable", "brilliant",
            "pleasant", "impressive", "fun", "friendly", "solid", "lovely", "clever"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "disappointing", "dull", "broken", "slow", "rude",
            "annoying", "mediocre", "clumsy", "bland", "poor", "weak"]
ADVERBS = ["", "really ", "quite ", "truly ", "rather ", "pretty ", "very "]
VERBS = ["was", "is", "seemed", "felt"]
OPENERS = ["", "honestly, ", "overall, ", "to be fair, ", "i think ", "frankly, "]


def clause(rng: random.Random) -> tuple[str, int]:
    """('the hotel room was not really charming', 0): an adjective's polarity, flipped by 'not'."""
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.35
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {'not ' if negated else ''}{rng.choice(ADVERBS)}{adjective}"
    return text, int(positive != negated)


def sentence(rng: random.Random) -> tuple[str, int]:
    first, label = clause(rng)
    if rng.random() < 0.4:   # 'X, but Y': Y decides (and is chosen to disagree with X, so X alone misleads)
        while True:
            second, label2 = clause(rng)
            if label2 != label:
                break
        return f"{rng.choice(OPENERS)}{first}, but {second}.", label2
    return f"{rng.choice(OPENERS)}{first}.", label


def main() -> None:
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 1000:
        text, label = sentence(rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    out = Path(__file__).resolve().parent / "glue_example"
    out.mkdir(exist_ok=True)
    for name, part in (("train.tsv", rows[:600]), ("dev.tsv", rows[600:])):
        (out / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))


if __name__ == "__main__":
    main()
