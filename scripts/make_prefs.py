#!/usr/bin/env python3
"""Generate synthetic preference data for betadpo's quickstart and tests.

Three prompt regimes, cycling row by row:
  clean  - the helpful answer is always the chosen one,
  mixed  - the helpful answer is chosen, but 25% of pairs are swapped,
  noise  - two equally good answers, which one is "chosen" is a coin flip.
A context-dependent beta has something real to learn: held-out reward accuracy can approach 1.0 on
clean prompts, ~0.75 on mixed and ~0.5 on noise.

Outputs (TRL formats), by default into graphs/quickstart/:
  train.jsonl                  standard format {prompt, chosen, rejected, regime}
  test.jsonl                   standard format, independent draw
  test_conversational.jsonl    conversational format: prompt = [{role: user, ...}], chosen/rejected =
                               [{role: assistant, ...}]
  test_implicit.jsonl          implicit-prompt format {chosen, rejected, regime}: both texts start with the
                               same prompt text

With --varied, every regime draws from many more templates (arithmetic and counting with a right and a wrong
answer, greetings, ordering, trip and pet advice, colours, numbers, several answer lengths), so that neither the
prompt's wording nor the answer's length gives the regime away as easily as in the default set; the swap rates
are the same. The default set (without --varied) is what the quickstart and the shared fixtures use.

Only the standard library is used; the output is a pure function of --seed (and --varied).
  python scripts/make_prefs.py [--out graphs/quickstart] [--seed 1234] [--train 1200] [--test 300] [--varied]
"""
import argparse
import json
import os
import random

# --- vocabulary (written for this project) ------------------------------------------------------------
THINGS = [
    "anchor", "apple", "backpack", "balloon", "basket", "beacon", "blanket", "bridge", "bucket", "cabin",
    "camera", "candle", "canoe", "castle", "cherry", "cloud", "comet", "copper", "cottage", "crystal",
    "desert", "dolphin", "drum", "engine", "falcon", "feather", "fence", "fiddle", "forest", "fountain",
    "garden", "giraffe", "guitar", "island", "jacket", "kite", "ladder", "lantern", "library", "lighthouse",
    "magnet", "mango", "mirror", "mountain", "needle", "notebook", "ocean", "orchard", "otter", "paddle",
    "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin", "puzzle",
    "rabbit", "rainbow", "robot", "rocket", "sailboat", "sandal", "scarf", "shell", "spoon", "stadium",
    "statue", "teapot", "telescope", "tower", "tractor", "trumpet", "tulip", "umbrella", "valley", "violin",
    "volcano", "wagon", "walnut", "whistle", "window", "wizard", "yacht", "zebra",
]
QUALITIES = [
    "bright", "calm", "cheerful", "clever", "cozy", "crisp", "curious", "delicate", "dusty", "elegant",
    "fancy", "fragile", "gentle", "glossy", "heavy", "humble", "light", "lively", "modern", "mysterious",
    "old", "plain", "polished", "proud", "rough", "round", "rusty", "shiny", "silent", "sleek", "small",
    "smooth", "soft", "solid", "sturdy", "tall", "tiny", "warm", "wide", "wild",
]
CARE = [
    "clean it with a soft cloth", "keep it away from direct sun", "check it once a week",
    "store it somewhere dry", "ask a friend to help you", "read the instructions first",
    "handle it slowly and carefully", "keep a spare one nearby",
]
REFUSALS = [
    " I do not want to answer.", " Ask someone else.", " That is not my job.", " Whatever.",
    " I cannot help with things like that.", " Figure that out on your own.", " Nope.",
]
DISMISSALS = [
    " That does not matter.", " Nobody cares about that.", " Just guess.", " It is not worth the effort.",
]

# --- prompt templates per regime ------------------------------------------------------------------------
# Each returns (user_text, helpful_answer, other_answer); answers start with a space (TRL convention: the
# prompt ends with "Assistant:" and the completion continues it).


def clean_pair(rng):
    thing = rng.choice(THINGS)
    q1, q2 = rng.sample(QUALITIES, 2)
    if rng.random() < 0.5:
        user = f"Describe the {thing} in one sentence."
        good = f" The {thing} is {q1} and {q2}."
    else:
        user = f"Say something nice about the {thing}."
        good = f" The {thing} looks {q1} and feels {q2}."
    return user, good, rng.choice(REFUSALS)


def mixed_pair(rng):
    thing = rng.choice(THINGS)
    care = rng.choice(CARE)
    if rng.random() < 0.5:
        user = f"How do I look after the {thing}?"
        good = f" Good question! Try to {care}."
    else:
        user = f"Any advice about the {thing}?"
        good = f" Yes: {care}."
    return user, good, rng.choice(DISMISSALS)


def noise_pair(rng):
    a, b = rng.sample(THINGS, 2)
    if rng.random() < 0.5:
        user = f"Which one do you like more, the {a} or the {b}?"
        return user, f" I like the {a} more.", f" I like the {b} more."
    user = f"Pick one for me: the {a} or the {b}."
    return user, f" I pick the {a}.", f" I pick the {b}."


REGIMES = [("clean", clean_pair), ("mixed", mixed_pair), ("noise", noise_pair)]
SWAP_PROB = {"clean": 0.0, "mixed": 0.25, "noise": 0.5}

# --- the varied set (--varied) ----------------------------------------------------------------------------
NAMES = ["Ada", "Bo", "Cleo", "Dev", "Elif", "Femi", "Goran", "Hana", "Ines", "Jun", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tova", "Umar", "Vera", "Wen", "Yara", "Zeno"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "grey", "white", "black", "pink", "gold"]
PLACES = ["mountains", "seaside", "desert", "city", "forest", "lake", "countryside", "island", "north", "valley"]
SKILLS = ["drawing", "chess", "cooking", "running", "singing", "writing", "swimming", "juggling", "knitting",
          "photography", "gardening", "reading maps"]
PETS = ["cat", "dog", "hamster", "parrot", "turtle", "rabbit", "goldfish", "lizard"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def wrong_by(rng, x, lo=0):
    """A plausible wrong answer near x."""
    return max(lo, x + rng.choice([-3, -2, -1, 1, 2, 3])) if x > lo + 3 else x + rng.choice([1, 2, 3])


def varied_clean(rng):
    """One right answer against a wrong or unhelpful one."""
    kind = rng.randrange(7)
    if kind < 2:
        return clean_pair(rng)
    if kind == 2:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        w = wrong_by(rng, a + b)
        user = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"How much is {a} + {b}?"])
        return user, f" {a} plus {b} is {a + b}.", f" {a} plus {b} is {w}."
    if kind == 3:
        word = rng.choice(THINGS)
        w = wrong_by(rng, len(word), lo=1)
        return (f"How many letters are in the word '{word}'?", f" The word '{word}' has {len(word)} letters.",
                f" The word '{word}' has {w} letters.")
    if kind == 4:
        name = rng.choice(NAMES)
        good = rng.choice([f" Hello {name}, it is lovely to see you! I hope your day is going well.",
                           f" Hi {name}! Welcome, and thank you for coming.",
                           f" Good morning, {name}. It is great to have you here."])
        return rng.choice([f"Write a short greeting for {name}.", f"Greet my friend {name}, please."]), good, \
            rng.choice(REFUSALS)
    if kind == 5:
        words = rng.sample(THINGS, 3)
        shuffled = words[:]
        while shuffled == sorted(words):
            rng.shuffle(shuffled)
        return (f"Put these words in alphabetical order: {', '.join(words)}.", f" {', '.join(sorted(words))}.",
                f" {', '.join(shuffled)}.")
    n = rng.randint(0, 20)
    w = rng.choice([k for k in range(21) if k != n])
    return f"Write the number {n} in words.", f" {NUMBER_WORDS[n].capitalize()}.", f" {NUMBER_WORDS[w].capitalize()}."


def varied_mixed(rng):
    """Helpful advice against a dismissal (25% of labels swapped)."""
    kind = rng.randrange(5)
    if kind < 2:
        return mixed_pair(rng)
    if kind == 2:
        place = rng.choice(PLACES)
        a, b = rng.sample(THINGS, 2)
        user = rng.choice([f"What should I pack for a trip to the {place}?", f"I am going to the {place}. Any tips?"])
        good = rng.choice([f" Pack a {a} and a {b}, and {rng.choice(CARE)}.", f" Bring a {a}. In the {place} it helps."])
        return user, good, rng.choice(DISMISSALS + REFUSALS[:2])
    if kind == 3:
        skill = rng.choice(SKILLS)
        user = rng.choice([f"How can I get better at {skill}?", f"I want to learn {skill}. Where do I start?"])
        good = rng.choice([f" Practice {skill} for a few minutes every day, and ask for feedback.",
                           f" Start small: one short {skill} session a day. Keep notes on what improves."])
        return user, good, rng.choice(DISMISSALS)
    pet = rng.choice(PETS)
    name = rng.choice(NAMES)
    return (f"Can you suggest a name for my {pet}?", f" How about {name}? It is short and easy to call.",
            rng.choice(DISMISSALS))


def varied_noise(rng):
    """Two equally good answers: which one is chosen is a coin flip."""
    kind = rng.randrange(5)
    if kind < 2:
        return noise_pair(rng)
    if kind == 2:
        thing = rng.choice(THINGS)
        c1, c2 = rng.sample(COLORS, 2)
        return (rng.choice([f"Suggest a color for my {thing}.", f"What color should I paint the {thing}?"]),
                f" Try {c1}.", f" Try {c2}.")
    if kind == 3:
        a, b = rng.sample(range(1, 11), 2)
        return "Give me a number between 1 and 10.", f" {a}.", f" {b}."
    a, b = rng.sample(NAMES, 2)
    pet = rng.choice(PETS)
    return f"Should I call my {pet} {a} or {b}?", f" Call it {a}.", f" Call it {b}."


VARIED_REGIMES = [("clean", varied_clean), ("mixed", varied_mixed), ("noise", varied_noise)]


def make_rows(n, seed, varied=False):
    rng = random.Random(seed)
    rows = []
    regimes = VARIED_REGIMES if varied else REGIMES
    for i in range(n):
        regime, gen = regimes[i % len(regimes)]
        user, good, other = gen(rng)
        chosen, rejected = good, other
        if rng.random() < SWAP_PROB[regime]:
            chosen, rejected = rejected, chosen
        rows.append({"user": user, "chosen": chosen, "rejected": rejected, "regime": regime})
    return rows


def standard(r):
    return {"prompt": f"User: {r['user']}\nAssistant:", "chosen": r["chosen"], "rejected": r["rejected"],
            "regime": r["regime"]}


def conversational(r):
    return {"prompt": [{"role": "user", "content": r["user"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            "regime": r["regime"]}


def implicit(r):
    s = standard(r)
    return {"chosen": s["prompt"] + s["chosen"], "rejected": s["prompt"] + s["rejected"], "regime": r["regime"]}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} rows)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "graphs", "quickstart"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--small", type=int, default=30, help="rows of the conversational / implicit test files")
    ap.add_argument("--varied", action="store_true", help="many more templates per regime (see above)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train = make_rows(args.train, args.seed, args.varied)
    test = make_rows(args.test, args.seed + 1, args.varied)
    small = make_rows(args.small, args.seed + 2, args.varied)
    write_jsonl(os.path.join(args.out, "train.jsonl"), [standard(r) for r in train])
    write_jsonl(os.path.join(args.out, "test.jsonl"), [standard(r) for r in test])
    write_jsonl(os.path.join(args.out, "test_conversational.jsonl"), [conversational(r) for r in small])
    write_jsonl(os.path.join(args.out, "test_implicit.jsonl"), [implicit(r) for r in small])


if __name__ == "__main__":
    main()
