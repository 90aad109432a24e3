#!/usr/bin/env python3
"""Train the quickstart tokenizer: byte-level BPE with 512 tokens on the generated preference text.

Special tokens: <|endoftext|> (id 0, eos and pad), <|im_start|> (1), <|im_end|> (2). No bos token.
Writes tokenizer.json and tokenizer_config.json (with a ChatML chat_template) into --out.

  python scripts/make_tokenizer.py [--data graphs/quickstart] [--out graphs/quickstart] [--vocab 512]

Needs the `tokenizers` package (scripts/.venv). Deterministic: the trainer sees the texts in file order.
"""
import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def texts(data_dir):
    """Every prompt / answer string of the standard- and conversational-format files, in file order."""
    for name in ["train.jsonl", "test.jsonl", "test_conversational.jsonl"]:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ["prompt", "chosen", "rejected"]:
                    v = row[key]
                    if isinstance(v, list):  # conversational: list of messages
                        for m in v:
                            yield m["role"]
                            yield m["content"]
                    else:
                        yield v


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "graphs", "quickstart")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default)
    ap.add_argument("--out", default=default)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--model-max-length", type=int, default=128)
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=SPECIALS,  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        min_frequency=1,
        show_progress=False,
    )
    corpus = list(texts(args.data))
    if not corpus:
        raise SystemExit(f"no text found under {args.data}; run scripts/make_prefs.py first")
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == args.vocab, tok.get_vocab_size()

    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIALS[0],
        "pad_token": SPECIALS[0],
        "bos_token": None,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": args.model_max_length,
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    sample = "User: Describe the piano in one sentence.\nAssistant: The piano is sturdy and warm."
    enc = tok.encode(sample)
    assert tok.decode(enc.ids) == sample
    print(f"wrote {args.out}/tokenizer.json ({tok.get_vocab_size()} tokens; sample: {len(sample)} chars -> "
          f"{len(enc.ids)} tokens) and tokenizer_config.json")


if __name__ == "__main__":
    main()
