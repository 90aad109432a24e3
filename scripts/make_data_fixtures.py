#!/usr/bin/env python3
"""Writes tests/fixtures/data/formats/: the same preference rows as JSONL and in the other forms
`datasets` users have them, so that tests can check betadpo reads every form as the same pairs.

From the first 16 rows of graphs/quickstart/train.jsonl (standard) and test_conversational.jsonl
(conversational), each loaded with `load_dataset("json", ...)` as a TRL user would:
  standard.jsonl, conversational.jsonl   the source rows, verbatim
  standard.json                          Dataset.to_json(lines=False): one JSON array
  standard.parquet, conversational.parquet   Dataset.to_parquet (snappy, pyarrow's default)
  standard_zstd.parquet                  pyarrow.parquet.write_table(compression="zstd")
  hub/data/train-0000{0,1}-of-00002.parquet, hub/data/test-00000-of-00001.parquet
                                         conversational rows 0-7, 8-11 (train) and 12-15 (test), the Hub's layout
  saved_dict/                            DatasetDict(train = rows 0-11, test = rows 12-15).save_to_disk (conversational)
  saved_standard/                        Dataset.save_to_disk (standard, one split)
  tool_calls.parquet                     conversational rows whose chosen answer calls a tool (content null)

Run with the scripts venv: scripts/.venv/bin/python scripts/make_data_fixtures.py
"""
import json
import os
import shutil

import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/data/formats")
ROWS = 16


def head(src, dst, n=ROWS):
    with open(os.path.join(ROOT, "graphs/quickstart", src), encoding="utf-8") as f:
        lines = [l for l in f if l.strip()][:n]
    with open(os.path.join(OUT, dst), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return load_dataset("json", data_files=os.path.join(OUT, dst), split="train")


def tool_call_rows():
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    rows = []
    for i in range(3):
        rows.append({
            "prompt": [{"role": "user", "content": f"What time is it? ({i})"}],
            "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "I cannot know.", "tool_calls": None}],
        })
    return rows


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "hub/data"))
    std = head("train.jsonl", "standard.jsonl")
    conv = head("test_conversational.jsonl", "conversational.jsonl")
    std.to_json(os.path.join(OUT, "standard.json"), lines=False)
    std.to_parquet(os.path.join(OUT, "standard.parquet"))
    pq.write_table(std.data.table, os.path.join(OUT, "standard_zstd.parquet"), compression="zstd")
    conv.to_parquet(os.path.join(OUT, "conversational.parquet"))
    conv.select(range(0, 8)).to_parquet(os.path.join(OUT, "hub/data/train-00000-of-00002.parquet"))
    conv.select(range(8, 12)).to_parquet(os.path.join(OUT, "hub/data/train-00001-of-00002.parquet"))
    conv.select(range(12, 16)).to_parquet(os.path.join(OUT, "hub/data/test-00000-of-00001.parquet"))
    DatasetDict({"train": conv.select(range(12)), "test": conv.select(range(12, 16))}).save_to_disk(os.path.join(OUT, "saved_dict"))
    std.save_to_disk(os.path.join(OUT, "saved_standard"))
    tools = tool_call_rows()
    Dataset.from_list(tools).to_parquet(os.path.join(OUT, "tool_calls.parquet"))
    with open(os.path.join(OUT, "tool_calls.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for r in tools:
            f.write(json.dumps(r) + "\n")
    for dirpath, _, files in sorted(os.walk(OUT)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
