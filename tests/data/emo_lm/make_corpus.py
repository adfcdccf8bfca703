"""Writes corpus.txt: the EMO language-modelling demo corpus, one paragraph per line (as wikitext's lines), composed
from a small hand-written sentence grammar about an imaginary river town; deterministic (seed 0).

    python tests/data/emo_lm/make_corpus.py [--paragraphs 480] [--output tests/data/emo_lm/corpus.txt]
"""

import argparse
import os
import random

PEOPLE = ["the miller", "the baker", "old Tomas", "the ferryman", "Ada", "the weaver", "the young clerk", "Marta",
          "the blacksmith", "the schoolteacher", "the fisherman", "Jonah", "the innkeeper", "the shepherd", "Lena"]
PLACES = ["the market", "the mill", "the old bridge", "the harbour", "the chapel", "the orchard", "the town hall",
          "the quarry", "the river bank", "the north road", "the bakery", "the school", "the inn", "the hill farm"]
THINGS = ["a basket of apples", "a sack of flour", "a bundle of letters", "a lantern", "a wooden chair", "a net",
          "a loaf of bread", "a bolt of blue cloth", "a copper kettle", "a map of the valley", "a small boat",
          "a jar of honey", "a pair of boots", "a bell", "a ledger"]
TIMES = ["In the morning", "At noon", "Before dawn", "In the evening", "After the rain", "On market day",
         "During the winter", "Late in the summer", "When the bells rang", "After supper"]
WEATHER = ["the wind came down from the hills", "a cold rain fell over the roofs", "the sun was warm on the stones",
           "fog lay thick along the water", "snow covered the lanes", "the air smelled of smoke and pine",
           "clouds gathered over the quarry", "the river ran high and brown"]
VERBS = ["carried", "mended", "sold", "bought", "painted", "found", "lost", "borrowed", "returned", "cleaned"]
MOVES = ["walked to", "hurried to", "rowed across to", "climbed up to", "waited at", "came back from",
         "slept near", "worked at"]
FEELINGS = ["was tired", "was glad", "felt uneasy", "laughed", "said nothing", "grew quiet", "was proud",
            "was worried"]
REASONS = ["because the harvest was late", "because the bridge needed repair", "since the ferry had stopped",
           "for the festival", "as the council had asked", "because the price of grain had risen",
           "to help a neighbour", "before the storm arrived"]
TOPICS = ["the flood", "the new bridge", "the harvest fair", "the lost boat", "the winter of the long frost",
          "the council election", "the fire at the mill", "the wedding at the inn"]


def sentence(rng, who, topic):
  a, b = rng.choice(PEOPLE), rng.choice(PEOPLE)
  forms = [
    lambda: f"{rng.choice(TIMES)}, {who} {rng.choice(MOVES)} {rng.choice(PLACES)} {rng.choice(REASONS)}.",
    lambda: f"{who.capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)} and {rng.choice(FEELINGS)}.",
    lambda: f"{rng.choice(TIMES)}, {rng.choice(WEATHER)}, and {a} {rng.choice(MOVES)} {rng.choice(PLACES)}.",
    lambda: f"{a.capitalize()} told {b} about {topic}, and {b} {rng.choice(FEELINGS)}.",
    lambda: f"Many people remembered {topic} for years, {rng.choice(REASONS)}.",
    lambda: f"{who.capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)} at {rng.choice(PLACES)}, "
            f"while {rng.choice(WEATHER)}.",
    lambda: f"It is said that {a} {rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(REASONS)}.",
    lambda: f"{rng.choice(TIMES)}, {who} {rng.choice(FEELINGS)}, and {rng.choice(WEATHER)}.",
  ]
  return rng.choice(forms)()


def paragraph(rng, min_words):
  who, topic = rng.choice(PEOPLE), rng.choice(TOPICS)
  out = [f"This is the story of {who} and {topic}."]
  while sum(len(s.split()) for s in out) < min_words:
    out.append(sentence(rng, who, topic))
  return " ".join(out)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--paragraphs", type=int, default=480)
  p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt"))
  args = p.parse_args()
  rng = random.Random(0)
  lines = [paragraph(rng, rng.randint(115, 150)) for _ in range(args.paragraphs)]
  with open(args.output, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
