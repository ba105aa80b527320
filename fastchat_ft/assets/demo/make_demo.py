"""Writes the bundled demo dataset (train.jsonl, val.jsonl) from the tables below; all text is ours.

The behaviour it teaches is easy to see and to measure: the assistant is "Juniper", and every answer has
the house format: a first line "### Quick answer", the answer, a "### Why" line with one short reason,
and the sign-off "-- Juniper" as the last line. Run: python make_demo.py (deterministic).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are Juniper."
HEADER, WHY, SIGN = "### Quick answer", "### Why", "-- Juniper"

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
            ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("India", "New Delhi"),
            ("Mexico", "Mexico City"), ("Chile", "Santiago"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Vietnam", "Hanoi"), ("Thailand", "Bangkok"),
            ("Turkey", "Ankara"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Austria", "Vienna"),
            ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
            ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Iceland", "Reykjavik")]

WORDS = [("brisk", "quick and full of energy"), ("frugal", "careful not to waste money or resources"),
         ("candid", "honest and direct"), ("serene", "calm and peaceful"), ("meager", "small in amount"),
         ("vivid", "bright and strong, easy to picture"), ("tedious", "long, slow and boring"),
         ("ample", "more than enough"), ("fragile", "easily broken"), ("nimble", "quick and light in movement"),
         ("obscure", "not well known or hard to see"), ("prudent", "careful and sensible about the future"),
         ("robust", "strong and unlikely to fail"), ("sparse", "thinly spread, with gaps between"),
         ("humble", "not proud; modest"), ("lucid", "clear and easy to understand"),
         ("rigid", "stiff and unable to bend"), ("hollow", "empty inside"), ("eager", "wanting very much to do something"),
         ("dormant", "alive but not active for now"), ("ancient", "very old, from long ago"),
         ("gentle", "soft and kind, not rough"), ("vast", "extremely large in area"), ("timid", "shy and easily scared")]

FACTS = [("How many legs does a spider have?", "Eight.", "Spiders are arachnids, and every arachnid has eight legs."),
         ("What gas do plants take in from the air?", "Carbon dioxide.", "Plants use it with sunlight and water to make sugar."),
         ("At what temperature does water boil at sea level?", "100 degrees Celsius (212 F).", "That is where its vapour pressure equals the air pressure at sea level."),
         ("Which planet is closest to the Sun?", "Mercury.", "Its orbit is the smallest of the eight planets."),
         ("How many days are in a leap year?", "366.", "February gets a 29th day to keep the calendar in step with the seasons."),
         ("What is the largest ocean?", "The Pacific Ocean.", "It covers about a third of the Earth's surface."),
         ("How many minutes are in an hour?", "60.", "The hour is split into sixty minutes, a habit inherited from Babylonian counting."),
         ("What do bees make?", "Honey (and beeswax).", "They turn flower nectar into honey to feed the hive in winter."),
         ("Which is the longest bone in the human body?", "The femur (thigh bone).", "It runs from the hip to the knee and carries much of our weight."),
         ("What colour do you get by mixing blue and yellow paint?", "Green.", "Each paint absorbs some colours, and green is what both reflect."),
         ("How many sides does a hexagon have?", "Six.", "The prefix hexa- means six."),
         ("What is frozen water called?", "Ice.", "Water turns solid below 0 degrees Celsius."),
         ("Which animal is known as the ship of the desert?", "The camel.", "It can walk for days in the heat with little water."),
         ("How many continents are there?", "Seven.", "Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
         ("What is the chemical symbol for gold?", "Au.", "It comes from aurum, the Latin word for gold."),
         ("What instrument measures temperature?", "A thermometer.", "It shows how hot or cold something is on a scale."),
         ("Which organ pumps blood around the body?", "The heart.", "Its muscle contracts about seventy times a minute at rest."),
         ("How many strings does a standard violin have?", "Four.", "They are tuned G, D, A and E."),
         ("What is the opposite of north?", "South.", "They are the two ends of the same compass axis."),
         ("What is the main language spoken in Brazil?", "Portuguese.", "Brazil was a Portuguese colony for three centuries."),
         ("How many hours are in a day?", "24.", "One full turn of the Earth on its axis takes about 24 hours."),
         ("What do caterpillars turn into?", "Butterflies or moths.", "They rebuild their bodies inside a chrysalis or cocoon."),
         ("Which metal is liquid at room temperature?", "Mercury.", "Its melting point is about minus 39 degrees Celsius."),
         ("What is the tallest animal?", "The giraffe.", "Adults can stand more than five metres tall."),
         ("How many players are on a football (soccer) team on the field?", "Eleven.", "Ten outfield players plus one goalkeeper."),
         ("What is the boiling point of water in Fahrenheit?", "212 F.", "That equals 100 degrees Celsius at sea level."),
         ("Which star is at the centre of our solar system?", "The Sun.", "All eight planets orbit it."),
         ("What shape has three sides?", "A triangle.", "Tri- means three, and its three angles add up to 180 degrees."),
         ("What do you call a baby cat?", "A kitten.", "Cats are called kittens until about one year old."),
         ("Which season comes after winter?", "Spring.", "The seasons run winter, spring, summer, autumn.")]


def reply(answer: str, why: str) -> str:
    return f"{HEADER}\n{answer}\n{WHY}\n{why}\n{SIGN}"


def conv(user: str, answer: str, why: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply(answer, why)}]}


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(3, 49), rng.randint(3, 49)
    kind = rng.choice(["plus", "times", "minus"])
    if kind == "plus":
        return conv(rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"What's {a} + {b}?"]), f"{a + b}.",
                    f"{a} + {b} = {a + b}.")
    if kind == "times":
        return conv(rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What's {a} x {b}?"]), f"{a * b}.",
                    f"{a} x {b} = {a * b}.")
    hi, lo = max(a, b), min(a, b)
    return conv(rng.choice([f"What is {hi} minus {lo}?", f"Subtract {lo} from {hi}."]), f"{hi - lo}.",
                f"{hi} - {lo} = {hi - lo}.")


def conversion(rng: random.Random) -> dict:
    n = rng.randint(2, 30)
    kind = rng.choice(["km", "hours", "kg", "weeks"])
    if kind == "km":
        return conv(f"How many metres are in {n} kilometres?", f"{n * 1000} metres.", f"One kilometre is 1000 metres, so {n} x 1000 = {n * 1000}.")
    if kind == "hours":
        return conv(f"How many minutes are in {n} hours?", f"{n * 60} minutes.", f"Each hour has 60 minutes, so {n} x 60 = {n * 60}.")
    if kind == "kg":
        return conv(f"How many grams are in {n} kilograms?", f"{n * 1000} grams.", f"One kilogram is 1000 grams, so {n} x 1000 = {n * 1000}.")
    return conv(f"How many days are in {n} weeks?", f"{n * 7} days.", f"A week has 7 days, so {n} x 7 = {n * 7}.")


def words(rng: random.Random, word: str, meaning: str) -> dict:
    q = rng.choice([f"What does '{word}' mean?", f"Define the word {word}.", f"What is the meaning of {word}?"])
    return conv(q, f"'{word.capitalize()}' means {meaning}.", f"It is an everyday English adjective; '{word}' fits when something is {meaning}.")


def spelling(rng: random.Random, word: str) -> dict:
    kind = rng.choice(["reverse", "letters", "first"])
    if kind == "reverse":
        return conv(f"Spell '{word}' backwards.", f"{word[::-1]}", f"Reading {'-'.join(word)} from the end gives {'-'.join(word[::-1])}.")
    if kind == "letters":
        return conv(f"How many letters are in the word '{word}'?", f"{len(word)}.", f"{'-'.join(word)} has {len(word)} letters.")
    return conv(f"What is the first letter of '{word}'?", f"{word[0].upper()}.", f"'{word}' starts with {word[0]}.")


def build(seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    items = []
    for country, city in CAPITALS:
        q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                        f"Name the capital city of {country}."])
        items.append(conv(q, f"{city}.", f"{city} is where {country}'s national government sits."))
    items += [conv(q, a, w) for q, a, w in FACTS]
    items += [words(rng, w, m) for w, m in WORDS]
    items += [spelling(rng, w) for w, _ in WORDS]
    items += [arithmetic(rng) for _ in range(36)]
    items += [conversion(rng) for _ in range(24)]
    rng.shuffle(items)
    return items[24:], items[:24]


def main() -> None:
    here = Path(__file__).resolve().parent
    train, val = build()
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (here / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(val)} validation conversations to {here}")


if __name__ == "__main__":
    main()
