"""Writes texts.jsonl and texts.parquet: 240 short texts on eight topics, for the quickstart.

Deterministic; rerun only to change the sample data:  python examples/data/make_texts.py
(needs pyarrow for the Parquet file).
"""
import itertools
import json
import random
from pathlib import Path

TOPICS = {
    "space": (
        ["The rocket", "A new telescope", "The Mars rover", "The space station crew", "An orbiting probe",
         "The lunar lander"],
        ["photographed a distant galaxy", "landed safely after a long journey", "measured dust storms on the planet",
         "detected water ice near the pole", "sent back images of Saturn's rings"],
        ["on Tuesday.", "during the night.", "for the first time.", "ahead of schedule.", "despite a fuel leak."],
    ),
    "cooking": (
        ["My grandmother", "The chef", "Our neighbour", "A food blogger", "The bakery on Main Street", "My roommate"],
        ["baked sourdough bread", "made a spicy tomato soup", "roasted vegetables with garlic",
         "prepared fresh pasta by hand", "served pancakes with maple syrup"],
        ["for the whole family.", "on a rainy Sunday.", "using only local ingredients.", "in under twenty minutes.",
         "and everyone asked for the recipe."],
    ),
    "football": (
        ["The home team", "Our striker", "The goalkeeper", "The young midfielder", "The visiting side",
         "The captain"],
        ["scored a late winner", "saved a penalty", "was sent off after a rough tackle",
         "won the cup final", "signed a new contract"],
        ["in front of a packed stadium.", "in extra time.", "after a tense second half.", "last weekend.",
         "to the delight of the fans."],
    ),
    "finance": (
        ["The central bank", "Stock markets", "The tech company", "Investors", "The pension fund",
         "A small startup"],
        ["raised interest rates", "fell sharply", "reported record quarterly profits",
         "moved money into government bonds", "closed a large funding round"],
        ["amid fears of inflation.", "after the earnings call.", "as the currency weakened.", "this quarter.",
         "despite a slowing economy."],
    ),
    "weather": (
        ["A heavy storm", "The heatwave", "Thick fog", "Freezing rain", "A strong wind", "Early snow"],
        ["closed roads across the region", "broke temperature records", "delayed flights at the airport",
         "knocked out power to thousands of homes", "surprised farmers in the valley"],
        ["on Monday morning.", "for the third day in a row.", "according to forecasters.", "overnight.",
         "before the weekend."],
    ),
    "health": (
        ["Doctors", "A new study", "The hospital", "Nutritionists", "The health ministry", "Researchers"],
        ["recommend walking thirty minutes a day", "found that sleep improves memory",
         "opened a new children's ward", "warned about too much sugar", "tested a promising vaccine"],
        ["for adults of all ages.", "in a large clinical trial.", "this spring.", "to reduce heart disease.",
         "with encouraging results."],
    ),
    "travel": (
        ["We", "The tourists", "My sister", "A group of hikers", "The backpackers", "Our family"],
        ["took the night train to Vienna", "explored the old town on foot", "missed the last ferry to the island",
         "camped beside a mountain lake", "found a cheap hotel near the beach"],
        ["during the summer holidays.", "and loved every minute.", "with only a paper map.", "last autumn.",
         "after a long flight."],
    ),
    "software": (
        ["The developers", "Our database", "The new release", "A security patch", "The compiler",
         "The open source project"],
        ["fixed a memory leak", "crashed under heavy load", "added support for Parquet files",
         "made queries twice as fast", "dropped support for old browsers"],
        ["in version two.", "after months of work.", "according to the changelog.", "on production servers.",
         "thanks to community contributions."],
    ),
}


def main():
    rng = random.Random(7)
    rows = []
    for topic, (subjects, verbs, tails) in TOPICS.items():
        combos = list(itertools.product(subjects, verbs, tails))
        rng.shuffle(combos)
        for s, v, t in combos[:30]:
            rows.append({"topic": topic, "text": f"{s} {v} {t}"})
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = i
    here = Path(__file__).parent
    with open(here / "texts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "topic": r["topic"], "text": r["text"]}) + "\n")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("pyarrow missing: wrote texts.jsonl only")
        return
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.int64()),
        "topic": [r["topic"] for r in rows],
        "text": [r["text"] for r in rows],
    })
    pq.write_table(table, here / "texts.parquet")
    print(f"wrote {len(rows)} texts")


if __name__ == "__main__":
    main()
