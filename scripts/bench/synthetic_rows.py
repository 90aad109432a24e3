"""Preference rows of a chosen token length, for benchmarks at real sequence lengths (scripts/bench/bench_vs_pytorch.py --row-tokens).

Each row is a prompt of about a quarter of the tokens and two different answers filling the rest, made of
common English words that the tokenizer encodes as one token each (with their leading space), so the
lengths are exact whatever the tokenizer: prompt + answer + EOS (+ BOS where the tokenizer adds one) stays
within `row_tokens`. The text is random word salad from a seeded stream: the same rows in every run.
"""
import random

WORDS = """the of and to in is that for it with as was on be by at this have from or one had not but what all
were when we there can an your which their said if do will each about how up out them then she many some so
these would other into has more her two like him see time could no make than first been its who now people my
made over did down only way find use may water long little very after words called just where most know""".split()


def single_token_words(tok):
    """The WORDS that `tok` (a tokenizers.Tokenizer) encodes as one token after a space."""
    words = [w for w in WORDS if len(tok.encode(" " + w, add_special_tokens=False).ids) == 1]
    if len(words) < 10:
        raise SystemExit("the tokenizer splits almost every common English word; --row-tokens needs word-level tokens")
    return words


def synthetic_rows(tokenizer_json, pairs, row_tokens, seed=0):
    """`pairs` TRL standard-format rows whose longer sequence (prompt + answer + EOS) is at most `row_tokens`
    tokens, the prompt about a quarter of them."""
    from tokenizers import Tokenizer
    words = single_token_words(Tokenizer.from_file(tokenizer_json))
    prompt_words = max(1, row_tokens // 4 - 1)  # after "Question:" (one or two tokens)
    answer_words = row_tokens - row_tokens // 4 - 3  # room for "Question:"'s second token, EOS and a BOS
    if answer_words < 1:
        raise SystemExit(f"--row-tokens {row_tokens} is too short for a prompt and an answer")
    rows = []
    for i in range(pairs):
        rng = random.Random(seed * 1_000_003 + i)
        say = lambda n: "".join(" " + rng.choice(words) for _ in range(n))
        rows.append(dict(prompt="Question:" + say(prompt_words), chosen=say(answer_words), rejected=say(answer_words)))
    return rows
