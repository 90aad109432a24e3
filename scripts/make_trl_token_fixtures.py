#!/usr/bin/env python3
"""Token ids as TRL's own DPO preprocessing produces them, for tests/tokenize_trl.rs.

Runs TRL's code, not a re-implementation of it: `DPOTrainer._prepare_dataset` (prompt extraction for
implicit prompts, EOS for standard rows, joint tokenization of prompt and prompt+completion, the
completion starting at `common_prefix_length`, the drop of prompts that fill `max_length` under
`keep_start`) and `DataCollatorForPreference` (the `max_length` cut by `truncation_mode`) on each case
below, and writes one JSON file per case to tests/fixtures/tokens/. The inputs that are not already
committed elsewhere (rows derived from the quickstart data, a chat template whose rendered prompt is not
a prefix of prompt+completion) are written next to them.

Needs the project venv (torch, transformers, trl): scripts/.venv/bin/python scripts/make_trl_token_fixtures.py
`../shared/fixtures` must be present (two cases use its tokenizer and data). Deterministic: rerunning
rewrites the same files.
"""

import argparse
import ast
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import transformers
import trl
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig
from trl.trainer import dpo_trainer
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "fixtures"
QUICK = ROOT / "graphs" / "quickstart"
OUT = ROOT / "tests" / "fixtures" / "tokens"
ROWS = 12

# ChatML, except that the generation prompt opens an empty thought block which a finished assistant turn
# does not have (as Gemma 4 and some Qwen templates do): the prompt rendered alone is not a prefix of
# prompt+completion, and TRL's "not a prefix" warning path decides where the completion starts.
NONPREFIX_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)

# Reads a row's `tools` and a `chat_template_kwargs` entry, which TRL passes to the template.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def rel(path: Path) -> str:
    """Paths as the Rust test resolves them: relative to the repository root (`../shared/...` included)."""
    return os.path.relpath(path.resolve(), ROOT)


def read_rows(path: Path, n: int = ROWS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def trl_case(tokenizer, rows: list[dict], max_length, truncation_mode: str) -> dict:
    """TRL's preprocessing and collation of `rows`, one example at a time (no padding)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, max_length=max_length, truncation_mode=truncation_mode, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_list(rows)
    # `_prepare_dataset` reads nothing from the trainer but its tokenizer. Its logger's `warning_once`
    # is cached per message, so clear it to see each case's warning.
    type(dpo_trainer.logger).warning_once.cache_clear()
    handler = Warnings()
    trl_logger = logging.getLogger("trl.trainer.dpo_trainer")
    trl_logger.addHandler(handler)
    try:
        prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train")
    finally:
        trl_logger.removeHandler(handler)
    collator = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode
    )
    # TRL's filter keeps row order; match kept examples back to their source rows by position.
    kept = []
    for ex in prepared:
        batch = collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        # The two rows are padded to the longer one; keep the real tokens.
        real = [int(n) for n in batch["attention_mask"].sum(dim=1)]
        rows_out = {k: [batch[k][i][: real[i]].tolist() for i in (0, 1)] for k in ("input_ids", "completion_mask")}
        kept.append(
            {
                "prompt_ids": ex["prompt_ids"],
                "chosen_ids": ex["chosen_ids"],
                "rejected_ids": ex["rejected_ids"],
                "chosen_input_ids": rows_out["input_ids"][0],
                "chosen_completion_mask": rows_out["completion_mask"][0],
                "rejected_input_ids": rows_out["input_ids"][1],
                "rejected_completion_mask": rows_out["completion_mask"][1],
            }
        )
    warnings = [m.removeprefix("[RANK 0] ") for m in handler.messages if "is not a prefix" in m]
    out = {"examples": kept, "not_prefix_warning": warnings[0] if warnings else None, "not_prefix_tail": None}
    if warnings:
        # The decoded end of the prompt that the warning quotes (a Python repr), as text.
        quoted = re.search(r"training sequence: ('.*'|\".*\")\. The model", warnings[0], re.S)
        out["not_prefix_tail"] = ast.literal_eval(quoted.group(1))
    return out


def source_index(rows: list[dict], tokenizer, kept: list[dict], max_length, mode) -> list[int]:
    """Which input row each kept example came from: TRL only drops (keep_start, prompt >= max_length)."""
    if max_length is None or mode != "keep_start":
        return list(range(len(rows)))
    full = trl_case(tokenizer, rows, None, mode)["examples"]
    return [i for i, ex in enumerate(full) if len(ex["prompt_ids"]) < max_length]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is absent: two cases use its tokenizer and data")

    # Inputs derived from the committed quickstart data.
    conv = read_rows(QUICK / "test_conversational.jsonl")
    implicit_conv = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "regime": r["regime"]} for r in conv
    ]
    write_jsonl(a.out / "implicit_conversational.jsonl", implicit_conv)
    # A prompt that ends in a space and answers without one: byte-level BPE merges the space into the
    # answer's first word, so the tokenized prompt is not a prefix of prompt+completion.
    std = read_rows(QUICK / "test.jsonl")
    trailing = [{**r, "prompt": r["prompt"] + " ", "chosen": r["chosen"].lstrip(), "rejected": r["rejected"].lstrip()} for r in std]
    # One answer already ends with EOS: TRL appends it only when absent.
    trailing[1]["chosen"] += "<|endoftext|>"
    write_jsonl(a.out / "trailing_space.jsonl", trailing)
    # Implicit prompts where TRL's `extract_prompt` cuts mid-word, where one answer extends the other
    # (no differing character: the cut falls one character before the shorter one ends), and where
    # characters take more than one byte (Python indexes characters).
    edge = [
        ("I like cats.", "I like cows."),
        ("Q: is it red? A: yes it is", "Q: is it red? A: no"),
        ("User: Yes", "User: Yes!"),
        ("Café au lait, merci.", "Café noir, merci."),
        ("Tea or coffee? Tea.", "Tea or coffee? Coffee."),
    ]
    write_jsonl(a.out / "implicit_edge.jsonl", [{"chosen": c, "rejected": r} for c, r in edge])
    # Conversations with tools (JSON text, as a dataset column often holds them; none on odd rows) and
    # chat_template_kwargs (thinking off on every third row).
    tool = [{"type": "function", "function": {"name": "get_time", "description": "The time <now> & here", "parameters": {"type": "object"}}}]
    with_tools = [
        {**r, "tools": json.dumps(tool) if i % 2 == 0 else None, "chat_template_kwargs": {"enable_thinking": i % 3 != 0}}
        for i, r in enumerate(conv)
    ]
    write_jsonl(a.out / "tools.jsonl", with_tools)
    tools_config = json.loads((QUICK / "tokenizer_config.json").read_text())
    tools_config["chat_template"] = TOOLS_TEMPLATE
    (a.out / "tools_tokenizer_config.json").write_text(json.dumps(tools_config, indent=1) + "\n")
    nonprefix_config = json.loads((QUICK / "tokenizer_config.json").read_text())
    nonprefix_config["chat_template"] = NONPREFIX_TEMPLATE
    (a.out / "nonprefix_tokenizer_config.json").write_text(json.dumps(nonprefix_config, indent=1) + "\n")

    quick_tok = (QUICK / "tokenizer.json", None)
    shared_tok = (SHARED / "tokenizer" / "tokenizer.json", None)
    nonprefix_tok = (QUICK / "tokenizer.json", a.out / "nonprefix_tokenizer_config.json")
    tools_tok = (QUICK / "tokenizer.json", a.out / "tools_tokenizer_config.json")
    # name, tokenizer (json, config), data, max_length, truncation_mode
    cases = [
        ("shared_standard", shared_tok, SHARED / "prefs" / "test.jsonl", 1024, "keep_start"),
        ("shared_conversational", shared_tok, SHARED / "prefs" / "test_conversational.jsonl", 1024, "keep_start"),
        ("quickstart_standard", quick_tok, QUICK / "test.jsonl", 1024, "keep_start"),
        ("quickstart_conversational", quick_tok, QUICK / "test_conversational.jsonl", 1024, "keep_start"),
        ("quickstart_implicit", quick_tok, QUICK / "test_implicit.jsonl", 1024, "keep_start"),
        ("implicit_edge", quick_tok, a.out / "implicit_edge.jsonl", 1024, "keep_start"),
        ("implicit_conversational", quick_tok, a.out / "implicit_conversational.jsonl", 1024, "keep_start"),
        ("trailing_space", quick_tok, a.out / "trailing_space.jsonl", 1024, "keep_start"),
        ("nonprefix_template", nonprefix_tok, QUICK / "test_conversational.jsonl", 1024, "keep_start"),
        ("tools_and_template_kwargs", tools_tok, a.out / "tools.jsonl", 1024, "keep_start"),
        ("standard_keep_start_16", quick_tok, QUICK / "test.jsonl", 16, "keep_start"),
        ("standard_keep_end_16", quick_tok, QUICK / "test.jsonl", 16, "keep_end"),
        ("conversational_keep_start_20", quick_tok, QUICK / "test_conversational.jsonl", 20, "keep_start"),
        ("conversational_keep_end_24", quick_tok, QUICK / "test_conversational.jsonl", 24, "keep_end"),
        ("nonprefix_keep_end_24", nonprefix_tok, QUICK / "test_conversational.jsonl", 24, "keep_end"),
    ]
    for name, (tok_json, tok_config), data, max_length, mode in cases:
        tokenizer = AutoTokenizer.from_pretrained(tok_json.parent)
        if tok_config is not None:
            tokenizer.chat_template = json.loads(tok_config.read_text())["chat_template"]
        rows = read_rows(data)
        out = trl_case(tokenizer, rows, max_length, mode)
        out["source_index"] = source_index(rows, tokenizer, out["examples"], max_length, mode)
        doc = {
            "made_by": "scripts/make_trl_token_fixtures.py",
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "tokenizer": rel(tok_json),
            "tokenizer_config": rel(tok_config) if tok_config else None,
            "data": rel(data),
            "rows": len(rows),
            "max_length": max_length,
            "truncation_mode": mode,
            **out,
        }
        (a.out / f"{name}.json").write_text(json.dumps(doc) + "\n")
        warned = "warned" if doc["not_prefix_warning"] else "no warning"
        print(f"{name}: {len(out['examples'])} of {len(rows)} rows kept, {warned}")


if __name__ == "__main__":
    main()
