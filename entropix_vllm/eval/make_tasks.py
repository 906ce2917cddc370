"""Generate the task files shipped with the eval (``entropix_vllm/eval/data/``).

    python -m entropix_vllm.eval.make_tasks            # rewrite data/*.jsonl
    python -m entropix_vllm.eval.make_tasks --check    # exit 1 if a file differs

Short questions with checkable answers that a ~100M-parameter chat model can
partly answer: two-digit sums and differences, one-digit products, one-step word
problems, number facts, capitals and multiple-choice questions. Small chat
models restate the question before answering ("34 + 27 = 61"), so the
arithmetic, word-problem and number-fact items are scored by their *last*
number (``last-number-equals``); capitals by ``contains``, the choices by
``multiple-choice``. Everything is produced here
from fixed seeds and word lists (nothing is downloaded), in two disjoint splits:

* ``dev``: what :mod:`entropix_vllm.tune` fits coefficients on;
* ``heldout``: what the tuned preset is reported on. No question of it is in
  ``dev`` (the arithmetic pairs are drawn without overlap, the countries and the
  word-problem templates are split).

One JSON object per line, the eval's task format: ``messages`` (one user turn),
``answer``, ``scorer`` and ``id`` (``<family>-<split>-<n>``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

NUMBER_HINT = " Answer with the number only."
NUMBER_SCORER = "last-number-equals"

# Number facts: (question, answer). Split by position: even -> dev, odd -> heldout.
FACTS = [
    ("How many legs does a dog have?", 4), ("How many days are in a week?", 7),
    ("How many legs does a spider have?", 8), ("How many months are in a year?", 12),
    ("How many hours are in a day?", 24), ("How many wheels does a bicycle have?", 2),
    ("How many sides does a triangle have?", 3), ("How many minutes are in an hour?", 60),
    ("How many legs does a bird have?", 2), ("How many sides does a square have?", 4),
    ("How many seconds are in a minute?", 60), ("How many days are in a year?", 365),
    ("How many legs does an insect have?", 6), ("How many wheels does a car have?", 4),
    ("How many fingers are on one hand?", 5), ("How many eyes does a person have?", 2),
    ("How many continents are there?", 7), ("How many colors are in a rainbow?", 7),
    ("How many players are on a soccer team on the field?", 11),
    ("How many strings does a standard guitar have?", 6),
    ("How many weeks are in a year?", 52), ("How many days are in February in a leap year?", 29),
    ("How many sides does a hexagon have?", 6), ("How many sides does a pentagon have?", 5),
    ("How many legs does a cat have?", 4), ("How many arms does an octopus have?", 8),
    ("How many hearts does a person have?", 1), ("How many noses does a person have?", 1),
    ("How many toes are on two feet?", 10), ("How many letters are in the English alphabet?", 26),
    ("How many planets are in the solar system?", 8), ("How many years are in a century?", 100),
    ("How many years are in a decade?", 10), ("How many cents are in a dollar?", 100),
    ("How many eggs are in a dozen?", 12), ("How many wheels does a tricycle have?", 3),
    ("How many legs does a horse have?", 4), ("How many sides does an octagon have?", 8),
    ("How many days are in a weekend?", 2), ("How many hours are in half a day?", 12),
]

# (country, capital); split by position: even -> dev, odd -> heldout.
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Spain", "Madrid"), ("Russia", "Moscow"), ("England", "London"), ("China", "Beijing"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Argentina", "Buenos Aires"),
    ("South Korea", "Seoul"), ("Mexico", "Mexico City"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
    ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Switzerland", "Bern"),
    ("the Netherlands", "Amsterdam"), ("the Philippines", "Manila"), ("Czechia", "Prague"),
    ("Romania", "Bucharest"), ("Ukraine", "Kyiv"), ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"), ("Venezuela", "Caracas"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Pakistan", "Islamabad"),
    ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Bangladesh", "Dhaka"), ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"),
]

CAPITAL_TEMPLATES = ["What is the capital of {c}?", "Which city is the capital of {c}?"]

# One-step word problems: (template, operation). {n}/{m} are small numbers, {a}
# a name, {o} a plural object. Split by position: even -> dev, odd -> heldout.
WORD_TEMPLATES = [
    ("{a} has {n} {o}. {a} gets {m} more {o}. How many {o} does {a} have now?", "+"),
    ("{a} had {n} {o} and gave away {m}. How many {o} does {a} have left?", "-"),
    ("There are {n} {o} in a box and {m} {o} on the table. How many {o} are there in all?", "+"),
    ("{a} bought {n} bags with {m} {o} in each bag. How many {o} did {a} buy?", "*"),
    ("A shelf holds {n} {o}. Someone adds {m} {o}. How many {o} are on the shelf?", "+"),
    ("{a} picked {n} {o} and ate {m} of them. How many {o} are left?", "-"),
    ("Each of {n} children has {m} {o}. How many {o} do they have together?", "*"),
    ("{a} saw {n} {o} in the morning and {m} {o} in the afternoon. How many {o} did {a} see?", "+"),
]
NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Jack", "Emma", "Leo", "Zoe"]
OBJECTS = ["apples", "books", "pencils", "cookies", "balls", "cards", "stickers", "flowers"]

# Multiple-choice questions: (question, right option, wrong options).
MC_ITEMS = [
    ("Which of these is a fruit?", "banana", ["chair", "hammer", "shoe"]),
    ("Which of these is an animal?", "dog", ["table", "spoon", "cloud"]),
    ("Which of these is a color?", "green", ["piano", "river", "bread"]),
    ("Which of these can fly?", "bird", ["fish", "rock", "cow"]),
    ("Which of these is a vegetable?", "carrot", ["lamp", "coin", "boot"]),
    ("Which of these is used to write?", "pen", ["plate", "pillow", "tire"]),
    ("Which of these is cold?", "ice", ["fire", "sun", "oven"]),
    ("Which of these is a planet?", "Mars", ["Paris", "Nile", "Everest"]),
    ("Which of these lives in water?", "fish", ["lion", "horse", "eagle"]),
    ("Which of these is a musical instrument?", "guitar", ["carpet", "onion", "bucket"]),
    ("Which of these is a day of the week?", "Monday", ["April", "Winter", "Noon"]),
    ("Which of these is a month?", "June", ["Tuesday", "Summer", "Dawn"]),
    ("Which of these is a shape?", "circle", ["apple", "river", "song"]),
    ("Which of these is a drink?", "milk", ["brick", "sock", "nail"]),
    ("Which of these do you wear on your feet?", "shoes", ["hat", "gloves", "scarf"]),
    ("Which of these is a body part?", "hand", ["cup", "door", "tree"]),
    ("Which of these is a vehicle?", "bus", ["banana", "pillow", "cloud"]),
    ("Which of these is hot?", "fire", ["snow", "ice", "frost"]),
    ("Which of these is a number?", "seven", ["blue", "happy", "quickly"]),
    ("Which of these is a bird?", "eagle", ["shark", "tiger", "snake"]),
    ("Which of these is a tool?", "hammer", ["grape", "cloud", "poem"]),
    ("Which of these is a season?", "winter", ["Friday", "noon", "March"]),
    ("Which of these is a metal?", "iron", ["wood", "paper", "wool"]),
    ("Which of these is a flower?", "rose", ["oak", "cactus", "moss"]),
    ("Which of these is a sport?", "soccer", ["piano", "bread", "violin"]),
    ("Which of these is a room in a house?", "kitchen", ["garden", "street", "forest"]),
    ("Which of these is a baby dog?", "puppy", ["kitten", "calf", "chick"]),
    ("Which of these is the opposite of big?", "small", ["tall", "large", "huge"]),
    ("Which of these is the opposite of hot?", "cold", ["warm", "boiling", "sunny"]),
    ("Which of these is the opposite of up?", "down", ["over", "high", "above"]),
    ("Which of these is a sea animal?", "whale", ["camel", "goat", "parrot"]),
    ("Which of these is a kind of tree?", "oak", ["tulip", "grass", "rose"]),
    ("Which of these is a farm animal?", "cow", ["shark", "penguin", "whale"]),
    ("Which of these is a language?", "Spanish", ["Mars", "Atlantic", "Sahara"]),
    ("Which of these is a continent?", "Africa", ["Paris", "Amazon", "Pacific"]),
    ("Which of these is a bakery food?", "bread", ["rock", "sand", "glass"]),
    ("Which of these is an insect?", "ant", ["dog", "trout", "frog"]),
    ("Which of these is a number greater than ten?", "twenty", ["two", "five", "eight"]),
    ("Which of these is a kitchen tool?", "knife", ["saddle", "anchor", "kite"]),
    ("Which of these gives us light at night?", "moon", ["rain", "wind", "grass"]),
]
LETTERS = "ABCD"


def _user(text: str) -> list:
    return [{"role": "user", "content": text}]


def _split_pairs(rng: random.Random, lo: int, hi: int, n_dev: int, n_held: int,
                 ordered: bool = True):
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)
             if ordered or a <= b]
    rng.shuffle(pairs)
    return pairs[:n_dev], pairs[n_dev:n_dev + n_held]


def add_items(rng, split_pairs):
    out = {}
    for split, pairs in split_pairs.items():
        out[split] = [{"messages": _user(f"What is {a} + {b}?" + NUMBER_HINT),
                       "answer": str(a + b), "scorer": NUMBER_SCORER} for a, b in pairs]
    return out


def sub_items(rng, split_pairs):
    out = {}
    for split, pairs in split_pairs.items():
        out[split] = [{"messages": _user(f"What is {max(a, b)} - {min(a, b)}?" + NUMBER_HINT),
                       "answer": str(max(a, b) - min(a, b)), "scorer": NUMBER_SCORER}
                      for a, b in pairs]
    return out


def mul_items(rng, split_pairs):
    out = {}
    for split, pairs in split_pairs.items():
        phr = ["What is {a} times {b}?", "What is {a} x {b}?", "What is {a} multiplied by {b}?"]
        out[split] = [{"messages": _user(rng.choice(phr).format(a=a, b=b) + NUMBER_HINT),
                       "answer": str(a * b), "scorer": NUMBER_SCORER} for a, b in pairs]
    return out


def word_items(rng, n_dev: int, n_held: int):
    out = {"dev": [], "heldout": []}
    for split, want, parity in (("dev", n_dev, 0), ("heldout", n_held, 1)):
        templates = [t for i, t in enumerate(WORD_TEMPLATES) if i % 2 == parity]
        seen = set()
        while len(out[split]) < want:
            tmpl, op = rng.choice(templates)
            if op == "*":
                n, m = rng.randint(2, 5), rng.randint(2, 5)
            else:
                n, m = rng.randint(2, 12), rng.randint(1, 9)
            if op == "-":
                n, m = max(n, m + 1), min(n, m)
            a, o = rng.choice(NAMES), rng.choice(OBJECTS)
            text = tmpl.format(a=a, n=n, m=m, o=o)
            if text in seen:
                continue
            seen.add(text)
            ans = n + m if op == "+" else (n - m if op == "-" else n * m)
            out[split].append({"messages": _user(text + NUMBER_HINT), "answer": str(ans),
                               "scorer": NUMBER_SCORER})
    return out


def capital_items(rng):
    out = {"dev": [], "heldout": []}
    for i, (country, capital) in enumerate(CAPITALS):
        split = "dev" if i % 2 == 0 else "heldout"
        q = CAPITAL_TEMPLATES[(i // 2) % len(CAPITAL_TEMPLATES)].format(c=country)
        out[split].append({"messages": _user(q + " Answer with the city name only."),
                           "answer": capital, "scorer": "contains"})
    return out


def fact_items(rng):
    out = {"dev": [], "heldout": []}
    for i, (question, answer) in enumerate(FACTS):
        split = "dev" if i % 2 == 0 else "heldout"
        out[split].append({"messages": _user(question + NUMBER_HINT), "answer": str(answer),
                           "scorer": NUMBER_SCORER})
    return out


def mc_items(rng):
    out = {"dev": [], "heldout": []}
    for i, (question, right, wrong) in enumerate(MC_ITEMS):
        split = "dev" if i % 2 == 0 else "heldout"
        options = [right] + list(wrong)
        rng.shuffle(options)
        letter = LETTERS[options.index(right)]
        body = " ".join(f"{LETTERS[j]}) {opt}" for j, opt in enumerate(options))
        out[split].append({"messages": _user(f"{question} {body}. Answer with the letter only."),
                           "answer": letter, "scorer": "multiple-choice"})
    return out


def build() -> dict:
    """``{file name: [items]}`` of every shipped task file."""
    rng = random.Random(20261202)
    add = add_items(rng, dict(zip(("dev", "heldout"), _split_pairs(rng, 10, 49, 40, 40))))
    sub = sub_items(rng, dict(zip(("dev", "heldout"), _split_pairs(rng, 10, 60, 20, 20, ordered=False))))
    mul = mul_items(rng, dict(zip(("dev", "heldout"), _split_pairs(rng, 2, 9, 25, 25))))
    word = word_items(rng, 25, 25)
    facts = fact_items(rng)
    caps = capital_items(rng)
    mc = mc_items(rng)
    files = {}
    for split in ("dev", "heldout"):
        for family, items in (("add", add), ("sub", sub), ("mul", mul), ("word", word),
                              ("facts", facts), ("capitals", caps), ("choice", mc)):
            for n, item in enumerate(items[split]):
                item["id"] = f"{family}-{split}-{n}"
        files[f"{split}.jsonl"] = (add[split] + sub[split] + mul[split] + word[split]
                                   + facts[split] + caps[split] + mc[split])
    dev = files["dev.jsonl"]
    files["tiny.jsonl"] = [dict(next(it for it in dev if it["id"].startswith(f)))
                           for f in ("add", "mul", "word", "facts", "capitals", "choice")]
    return files


def render(items) -> str:
    return "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    ap.add_argument("--out", type=Path, default=DATA, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    files = build()
    dev_q = {json.dumps(it["messages"]) for it in files["dev.jsonl"]}
    overlap = [it["id"] for it in files["heldout.jsonl"] if json.dumps(it["messages"]) in dev_q]
    if overlap:
        print(f"held-out questions also in dev: {overlap}", file=sys.stderr)
        return 1
    bad = 0
    for name, items in files.items():
        path = args.out / name
        text = render(items)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path}: differs from the generator", file=sys.stderr)
                bad += 1
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(items)} items")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
