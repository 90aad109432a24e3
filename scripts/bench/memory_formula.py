#!/usr/bin/env python3
"""betadpo's peak memory while training, estimated from the model's shape and the batch (docs/long-sequences.md).

The same formula the docs state, as code: `scripts/bench/bench_vs_pytorch.py` prints it beside each measured peak,
and it can be run alone to size a batch before training:
    python3 scripts/bench/memory_formula.py --config HF_DIR_OR/hf_export.json --rows 16 --row-tokens 1024 \
        --answer-tokens 12288 [--gradient-checkpointing] [--vocab-chunk 8192] [--attention-chunks 8] [--trainable N] \
        [--frozen-bytes-per-weight 2] [--micro-batch-tokens 1024] [--grad-accum 1]
--rows, --row-tokens and --answer-tokens describe one micro-batch (`train --batch-size` pairs, as laid out); the
estimate is of one pass of the train graph, which holds at most `train --micro-batch-tokens` tokens of whole rows
(1,024 by default on the CPU: SmolLM2's 891-token rows of 511-token pairs one at a time).
Float32 everywhere (4 bytes) but frozen weights stored in half precision (--frozen-bytes-per-weight 2: LoRA on a
bf16 checkpoint). All terms in bytes; `total` is their sum.

Terms (P parameters, P_t trainable; R rows of T tokens, N = R x T; A answer tokens; L blocks of width H,
MLP width I, `heads` query heads, vocabulary V):
  runtime     a fixed 0.35 GiB: the binary, ONNX Runtime, two sessions' graphs and plans, the tokenizer
  weights     4 P_t + b (P - P_t)  every parameter, once (train and eval sessions share them); b bytes a frozen
                                  weight as stored (4, or 2 in half precision)
  moments     8 P_t               AdamW's two moments (the fused host optimizer)
  gradients   4 P_t               the train graph's gradient outputs
  gradient_sum 4 P_t              the sum of the passes' gradients, when a step has several (--grad-accum > 1,
                                  or a micro-batch in passes of --micro-batch-tokens)
  activations plain:     4 N L (12 H + 5 I + heads T)   what every block keeps for its backward pass:
                                  norms, q/k/v/o, rotary, residuals (12 H), the MLP's gate/up/act/product (5 I)
                                  and the attention probabilities [heads, T] per token (heads T: the softmax's
                                  gradient reads its output, and the scores die with the softmax);
                                  in K query chunks (--attention-chunks K) the probabilities' lower triangle
                                  and one chunk's scores and gradients: heads T ((K + 1) / 2K + 2 / K)
              recompute: 4 N L H + one block of the above + 4 N 2 I   block inputs, one block recomputed at a
                                  time, and the widest of its gradients (the MLP's; the attention's are in its term)
  (R below: the rows of one pass)
  mask        4 R T^2             the packed/padded attention mask (one [T, T] per row, shared by the blocks)
  logits      plain (--vocab-chunk 0): 4 A V x 3 (logits, log-softmax, its gradient)
              sliced: 4 A min(V, chunk) x 3
"""
import argparse
import json
import os

RUNTIME_BYTES = int(0.35 * 2**30)
FLOAT = 4


def model_shape(config):
    """(layers, hidden, intermediate, heads, vocab) of a Hugging Face config dict (a text config inside
    a multimodal one is used)."""
    c = config.get("text_config", config)
    return dict(layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                intermediate=c.get("intermediate_size", 4 * c["hidden_size"]),
                heads=c["num_attention_heads"], vocab=c["vocab_size"])


def load_config(path):
    """A config.json, an export_hf.py hf_export.json (its "config"), or a folder holding either."""
    if os.path.isdir(path):
        for name in ("hf_export.json", "config.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    d = json.load(open(path))
    return d.get("config", d)


def block_activations_per_token(shape, row_tokens, attention_chunks=0):
    """Floats one decoder block keeps per token for its backward pass (see the module doc)."""
    k = attention_chunks
    attention = 1.0 if k < 2 else (k + 1) / (2 * k) + 2 / k
    return 12 * shape["hidden"] + 5 * shape["intermediate"] + attention * shape["heads"] * row_tokens


def pass_rows(rows, row_tokens, micro_batch_tokens):
    """Rows one pass of the train graph computes of a micro-batch of `rows` rows (`train::batch::collate_parts`):
    as many whole rows as fit `micro_batch_tokens`, at least one; all of them for 0."""
    if micro_batch_tokens <= 0:
        return rows
    return min(rows, max(1, micro_batch_tokens // row_tokens))


# `train --micro-batch-tokens` when not given, on the CPU (`train::config::DEFAULT_MICRO_BATCH_TOKENS`)
TRAIN_MICRO_BATCH_TOKENS = 1024


def build_graph_defaults(gradient_checkpointing):
    """(query chunks per attention, words per vocabulary slice) that `build-graph` uses when neither flag is
    given: 8 and 8,192 with --gradient-checkpointing, else 0 and 0 (`MemoryOptions::long_rows`)."""
    return (8, 8192) if gradient_checkpointing else (0, 0)


def estimate(shape, params, trainable, rows, row_tokens, answer_tokens, gradient_checkpointing, vocab_chunk,
             attention_chunks=0, gradient_sum=False):
    """The peak's terms in bytes, and their sum as "total", for one pass of `rows` rows (`gradient_sum`: the
    step sums several passes' gradients)."""
    n = rows * row_tokens
    block = FLOAT * n * block_activations_per_token(shape, row_tokens, attention_chunks)
    if gradient_checkpointing:
        # one block's forward tensors, recomputed; of its gradients only the MLP's widest two at once (the
        # attention's are in the chunk term): by the time the attention's gradients exist, the MLP's tensors are gone
        acts = FLOAT * n * shape["layers"] * shape["hidden"] + block + FLOAT * n * 2 * shape["intermediate"]
    else:
        acts = shape["layers"] * block
    width = shape["vocab"] if vocab_chunk <= 0 else min(shape["vocab"], vocab_chunk)
    terms = dict(runtime=RUNTIME_BYTES, weights=FLOAT * params, moments=2 * FLOAT * trainable,
                 gradients=FLOAT * trainable, activations=acts, mask=FLOAT * rows * row_tokens ** 2,
                 logits=3 * FLOAT * answer_tokens * width)
    if gradient_sum:
        terms["gradient_sum"] = FLOAT * trainable
    terms["total"] = sum(terms.values())
    return terms


def recommendation(plain, memory_bytes):
    """Whether to build with --gradient-checkpointing, from the plain graph's terms: on when what the blocks
    keep is a quarter of the machine's memory or more (it costs about one more forward pass a step), or when
    the plain graph would not fit."""
    share = plain["activations"] / memory_bytes
    if share >= RECOMPUTE_SHARE or plain["total"] > memory_bytes:
        return (f"build-graph --gradient-checkpointing: the blocks keep {plain['activations'] / 2**30:.1f} GiB "
                f"({share:.0%} of this machine's memory)")
    return (f"no --gradient-checkpointing needed: the blocks keep {plain['activations'] / 2**30:.1f} GiB "
            f"({share:.0%} of this machine's memory)")


# The share of memory the plain graph's kept activations may take before recomputing them pays.
RECOMPUTE_SHARE = 0.25


def describe(terms):
    """One line: each term in MiB."""
    parts = [f"{k} {v / 2**20:,.0f}" for k, v in terms.items() if k != "total"]
    return f"{terms['total'] / 2**20:,.0f} MiB = " + " + ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="config.json, hf_export.json or a folder holding one")
    ap.add_argument("--params", type=int, help="parameters (default: counted from the config's shape, roughly)")
    ap.add_argument("--trainable", type=int, help="trainable parameters (default: all)")
    ap.add_argument("--frozen-bytes-per-weight", type=int, default=FLOAT, choices=(2, 4),
                    help="bytes of a frozen weight as stored: 2 for half-precision frozen weights (LoRA on a bf16 model)")
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--row-tokens", type=int, required=True)
    ap.add_argument("--answer-tokens", type=int, required=True)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, default=TRAIN_MICRO_BATCH_TOKENS,
                    help="train --micro-batch-tokens (default 1024, train's on the CPU; 0 on a GPU)")
    ap.add_argument("--grad-accum", type=int, default=1, help="train --grad-accum")
    ap.add_argument("--vocab-chunk", type=int, default=None,
                    help="words per vocabulary slice (default: 8192 with --gradient-checkpointing, else 0, as build-graph)")
    ap.add_argument("--attention-chunks", type=int, default=None,
                    help="query chunks per attention (default: 8 with --gradient-checkpointing, else 0, as build-graph)")
    a = ap.parse_args()
    default_chunks, default_vocab_chunk = build_graph_defaults(a.gradient_checkpointing)
    chunks = a.attention_chunks if a.attention_chunks is not None else default_chunks
    vocab_chunk = a.vocab_chunk if a.vocab_chunk is not None else default_vocab_chunk
    shape = model_shape(load_config(a.config))
    params = a.params or (shape["vocab"] * shape["hidden"]
                          + shape["layers"] * (4 * shape["hidden"] ** 2 + 3 * shape["hidden"] * shape["intermediate"]))
    trainable = a.trainable if a.trainable is not None else params
    # the estimate counts 4 bytes a parameter: frozen half weights count as half as many float32 ones
    params = trainable + (params - trainable) * a.frozen_bytes_per_weight // FLOAT
    rows = pass_rows(a.rows, a.row_tokens, a.micro_batch_tokens)
    answer_tokens = -(-a.answer_tokens * rows // a.rows)
    several = rows < a.rows or a.grad_accum > 1
    if rows < a.rows:
        print(f"one pass: {rows} of the micro-batch's {a.rows} rows (--micro-batch-tokens {a.micro_batch_tokens})")
    t = estimate(shape, params, trainable, rows, a.row_tokens, answer_tokens, a.gradient_checkpointing, vocab_chunk,
                 chunks, gradient_sum=several)
    print(describe(t))
    plain = estimate(shape, params, trainable, rows, a.row_tokens, answer_tokens, False, vocab_chunk, gradient_sum=several)
    print(recommendation(plain, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))


if __name__ == "__main__":
    main()
