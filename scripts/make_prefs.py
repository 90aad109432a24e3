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

Only the standard library is used; the output is a pure function of --seed.
  python scripts/make_prefs.py [--out graphs/quickstart] [--seed 1234] [--train 1200] [--test 300]
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


def make_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        regime, gen = REGIMES[i % len(REGIMES)]
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
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train = make_rows(args.train, args.seed)
    test = make_rows(args.test, args.seed + 1)
    small = make_rows(args.small, args.seed + 2)
    write_jsonl(os.path.join(args.out, "train.jsonl"), [standard(r) for r in train])
    write_jsonl(os.path.join(args.out, "test.jsonl"), [standard(r) for r in test])
    write_jsonl(os.path.join(args.out, "test_conversational.jsonl"), [conversational(r) for r in small])
    write_jsonl(os.path.join(args.out, "test_implicit.jsonl"), [implicit(r) for r in small])


if __name__ == "__main__":
    main()
