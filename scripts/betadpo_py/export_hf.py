"""Export a Hugging Face causal LM to the ONNX graph betadpo trains.

The exported graph has exactly two inputs, `input_ids` and `attention_mask` (int64, dynamic axes `batch` and
`sequence`), and one output, `logits` ([batch, sequence, vocab]); no past key values (the model runs with
use_cache=False inside a small wrapper module whose forward returns only the logits, so initializer names
start with `m.`).

Usage
  # a pretrained model (hub id or local directory; GGUF via --gguf-file)
  python scripts/tools/export_hf.py --model HuggingFaceTB/SmolLM2-135M --out /tmp/smollm2
  # a tiny random model of a known family (see TINY_FAMILIES), seeded
  python scripts/tools/export_hf.py --tiny llama --out tests/fixtures/models/llama --golden
  # a random-weight model of a real model's shape (see SHAPES: the public config.json numbers), or of any
  # config.json; benchmarks at real sizes without downloading weights
  python scripts/tools/export_hf.py --shape llama-3.2-3b --dtype bfloat16 --out /tmp/llama3b --no-hf-map
Options
  --exporter dynamo|torchscript   torch.onnx.export(dynamo=True) (default) or the TorchScript exporter
  --opset N                       default 18 for dynamo, 17 for torchscript
  --dtype float32|float16|bfloat16
  --golden                        also write golden.safetensors + golden.json (PyTorch autograd, float64)
  --no-hf-map                     skip hf_export.json (mapping a multi-GB model costs its size again in
                                  memory and in a temporary checkpoint on disk)
  --test-jsonl / --tokenizer      data for the golden batch (default: graphs/quickstart/)

Beside model.onnx it writes hf_export.json: the Hugging Face config and, for every tensor that
save_pretrained writes (tied weights once), the ONNX initializer holding it (transposed or offset where the
exporter changed it). build-graph copies it into the artifacts, and `betadpo export --hf DIR` uses it to
write the trained weights back as a checkpoint that AutoModelForCausalLM.from_pretrained(DIR) loads.
`--map-only` writes only that file for an existing --out/model.onnx.

Random models (--tiny, --shape) are initialised as transformers does (seeded), then every constant tensor
(norm weights, biases) gets seeded N(0, 0.1) noise, so they look like a trained model's and every parameter
has a distinct value. `--shape` models are built directly in --dtype (a 3 B model built in float32 first
would need 13 GB); `build_random(shape_config(NAME), seed, dtype)` rebuilds the very same weights in
another process (scripts/bench/bench_vs_pytorch.py --torch-model shape:NAME does, to train the same model).

After the export the ONNX model is run with onnxruntime and its logits are compared with PyTorch's on a
padded batch; the script fails when the max abs difference exceeds --tolerance (1e-4 for float32; for
large logits, tolerance/5 times the largest |logit|, i.e. 2e-5 relative). onnxruntime's CPU provider has
no kernels for some bfloat16 ops (e.g. Where); such a model is not run here (a printed notice says so):
betadpo computes in float32 and reads the bfloat16 weights through casts.

Golden values (same format as the fixtures shared with the project, see tests/fixtures/models/README.md):
a batch of the first 4 pairs of --test-jsonl (rows 0..4 chosen, 4..8 rejected), the model's logits and
lm_head input ("hidden"), policy log-probs, a seeded non-zero beta head, the DPO loss with the learned
beta at the last prompt token, its gradient for every ONNX initializer that is a model parameter (tied
copies get their own gradient, exactly as the ONNX graph uses them), the per-sequence-beta variant and
the fixed-beta (0.1) variant. Everything is computed in float64 with PyTorch autograd and then checked
independently against onnxruntime with directional finite differences of the exported graph.
"""
import argparse
import copy
import json
import math
import os
import tempfile

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from betadpo_py.lm_feeds import lm_feeds
from betadpo_py.paths import QUICKSTART

TWO_GB = 2 * 1024 ** 3

# --------------------------------------------------------------------------------------------------------
# Tiny random models: small enough for committed test fixtures (< 1 MB), big enough to be a real model.
# --------------------------------------------------------------------------------------------------------
_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=128)
TINY_FAMILIES = {
    "gpt2": dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                 bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
    "llama": dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    # a sliding window shorter than the golden batch (31 tokens), so the graph really differs from Llama's
    "mistral": dict(_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16,
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "qwen2": dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(_COMMON, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                               "rope_type": "default"},
                     use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "opt": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0,
                eos_token_id=0, tie_word_embeddings=True),
    "phi3": dict(_COMMON, num_key_value_heads=2, original_max_position_embeddings=128, pad_token_id=None,
                 bos_token_id=0, eos_token_id=0, tie_word_embeddings=False),
    "gemma": dict(_COMMON, num_key_value_heads=1, head_dim=16, pad_token_id=None, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=True),
}
DEFAULT_EXPORTER = {"gpt2": "torchscript", "opt": "torchscript", "phi3": "torchscript"}  # others: dynamo


def tiny_seed(family, seed):
    """Each family gets its own weights (Llama and Mistral would otherwise be identical)."""
    return seed + sorted(TINY_FAMILIES).index(family) * 1000

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# --------------------------------------------------------------------------------------------------------
# Real shapes: the architecture numbers of the public config.json files (the weights are random)
# --------------------------------------------------------------------------------------------------------
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, high_freq_factor=4.0,
                    low_freq_factor=1.0, original_max_position_embeddings=8192)
_LLAMA3 = dict(vocab_size=128256, intermediate_size=8192, num_key_value_heads=8, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True,
               bos_token_id=128000, eos_token_id=128001)
SHAPES = {
    # Qwen/Qwen2.5-0.5B: 494 M parameters
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                                   tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
    # meta-llama/Llama-3.2-1B: 1.24 B
    "llama-3.2-1b": ("llama", dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   head_dim=64)),
    # meta-llama/Llama-3.2-3B: 3.21 B
    "llama-3.2-3b": ("llama", dict(_LLAMA3, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                   head_dim=128)),
    # meta-llama/Llama-3.1-8B: 8.03 B
    "llama-3.1-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                                   rope_parameters=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False)),
}


def shape_config(shape):
    """The config of a --shape: a SHAPES name or a config.json file."""
    from transformers import AutoConfig
    if shape in SHAPES:
        family, kw = SHAPES[shape]
        return AutoConfig.for_model(family, **kw)
    if shape.endswith(".json") and os.path.isfile(shape):
        return AutoConfig.from_pretrained(shape)
    raise SystemExit(f"unknown --shape {shape!r}: neither a config.json file nor one of {', '.join(SHAPES)}")


def log(*a):
    print(*a, flush=True)


def build_tiny(family, seed, dtype):
    from transformers import AutoConfig
    if family not in TINY_FAMILIES:
        raise SystemExit(f"unknown --tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config = AutoConfig.for_model(family, **TINY_FAMILIES[family])
    return build_random(config, seed, "float32").to(DTYPES[dtype])


def build_random(config, seed, dtype, attn="eager"):
    """A seeded random model of `config`, built in `dtype`: the same weights in every process."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=DTYPES[dtype])
    # A pretrained model has no constant tensors: norm weights are not exactly 1 (or 0 for Gemma's
    # 1 + w RMSNorm), biases not exactly 0. Perturb every constant parameter with a seeded N(0, 0.1), so
    # that norms and biases matter and every parameter has a distinct value (needed to match ONNX
    # initializers to parameters by value).
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        seen = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def load_pretrained(path, dtype, gguf_file=None, trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    kw = dict(dtype=DTYPES[dtype], attn_implementation="eager", trust_remote_code=trust_remote_code)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if gguf_file:
        # GGUF weights are dequantized on load: the model is a plain float model, and save_pretrained
        # (the name map, `export --hf` round trips) must not refuse it as a quantized one
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask -> logits; no cache, no other outputs."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      return_dict=True).logits


def example_inputs(vocab, batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1:
        mask[1, seq - 3:] = 0  # right padding on one row: the traced graph must not assume an all-ones mask
    return ids, mask


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------
def export(model, out_dir, exporter, opset, external_data):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    wrapper = LogitsOnly(model).eval()
    ids, mask = example_inputs(model.config.get_text_config().vocab_size)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with torch.no_grad():
        if exporter == "dynamo":
            opset = opset or 18
            dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            prog = torch.onnx.export(wrapper, (ids, mask), dynamo=True, opset_version=opset,
                                     dynamic_shapes=dyn, optimize=True, **names)
            ext = external_data != "never"
            if external_data == "auto":
                ext = True  # what the dynamo exporter does by default; required past 2 GB anyway
            prog.save(path, external_data=ext)
        else:
            opset = opset or 17
            dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                   "logits": {0: "batch", 1: "sequence"}}
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = os.path.join(tmp, "model.onnx")
                torch.onnx.export(wrapper, (ids, mask), tmp_path, dynamo=False, opset_version=opset,
                                  dynamic_axes=dyn, do_constant_folding=True, **names)
                proto = onnx.load(tmp_path, load_external_data=True)
                size = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
                ext = external_data == "always" or (external_data == "auto" and size > TWO_GB - (64 << 20))
                _fix_output_dims(proto)
                if ext:
                    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                                    location="model.onnx.data", size_threshold=0)
                else:
                    onnx.save_model(proto, path)
    if exporter == "dynamo":
        # name the output's dynamic axes like the inputs' (dynamo names them after its symbols), and drop
        # the Python stack traces the exporter stores per node: they hold this machine's absolute paths
        # and source line numbers, so the file would change with the checkout location
        proto = onnx.load(path, load_external_data=False)
        changed = _fix_output_dims(proto)
        changed = _strip_stack_traces(proto) or changed
        if changed:
            onnx.save_model(proto, path)  # external data references are kept as they are
    onnx.checker.check_model(path)
    return path, opset


def _strip_stack_traces(proto):
    def nodes(graph):
        for n in graph.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g)
                for g in a.graphs:
                    yield from nodes(g)
    all_nodes = list(nodes(proto.graph)) + [n for f in proto.functions for n in f.node]
    changed = False
    for n in all_nodes:
        keep = [m for m in n.metadata_props if m.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(n.metadata_props):
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
            changed = True
    return changed


def _fix_output_dims(proto):
    changed = False
    for out in proto.graph.output:
        if out.name != "logits":
            continue
        dims = out.type.tensor_type.shape.dim
        for i, want in ((0, "batch"), (1, "sequence")):
            if i < len(dims) and not dims[i].HasField("dim_value") and dims[i].dim_param != want:
                dims[i].dim_param = want
                changed = True
    return changed


def describe_exporter(exporter, opset):
    return f"torch.onnx.export dynamo={exporter == 'dynamo'} opset {opset}"


# --------------------------------------------------------------------------------------------------------
# onnxruntime helpers
# --------------------------------------------------------------------------------------------------------
def ort_session(model_or_path, extra_outputs=()):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    if extra_outputs or not isinstance(model_or_path, str):
        proto = model_or_path if not isinstance(model_or_path, str) else onnx.load(model_or_path)
        if extra_outputs:
            proto = copy.deepcopy(proto)
            for name in extra_outputs:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model_or_path, so, providers=["CPUExecutionProvider"])


def verify(model, onnx_path, batches, tolerance):
    """Max |logit| difference between onnxruntime and PyTorch (same dtype) on padded batches of
    different shapes (the graph must not have baked in the export's example shape)."""
    try:
        sess = ort_session(onnx_path)
    except Exception as e:  # onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented
        half = next(iter({p.dtype for p in model.parameters()})) in (torch.float16, torch.bfloat16)
        if not half or "NOT_IMPLEMENTED" not in str(e):
            raise
        log(f"verify: NOT RUN: onnxruntime's CPU provider cannot run this half-precision graph ({str(e).strip()})")
        return None
    worst = 0.0
    for ids, mask in batches:
        got = sess.run(["logits"], lm_feeds(sess, ids.numpy(), mask.numpy()))[0]
        with torch.no_grad():
            want = LogitsOnly(model)(ids, mask).float().numpy()
        got = got.astype(np.float32)
        if got.shape != want.shape:
            raise SystemExit(f"FAILED: onnxruntime logits have shape {got.shape}, PyTorch {want.shape}")
        diff = np.abs(got - want)
        valid = mask.numpy().astype(bool)
        err_all = float(diff.max())
        err_valid = float(diff[valid].max())
        scale = float(np.abs(want[valid]).max())
        # float32 rounding grows with the logits' magnitude: a real model (|logit| ~ 30) differs by ~1e-5
        # relative; allow tolerance, or tolerance/5 relative to the largest logit when that is larger
        tol = max(tolerance, tolerance / 5 * scale)
        log(f"verify: batch {list(ids.shape)}: max |logit diff| onnxruntime vs PyTorch = {err_all:.3g} "
            f"(non-padding positions {err_valid:.3g}; max |logit| {scale:.3g}; tolerance {tol:.3g})")
        if not err_valid <= tol:
            raise SystemExit(f"FAILED: onnxruntime logits differ from PyTorch by {err_valid:.3g} > {tol:.3g}")
        worst = max(worst, err_valid)
    return worst


# --------------------------------------------------------------------------------------------------------
# Golden values
# --------------------------------------------------------------------------------------------------------
BETA_FIXED = 0.1
BETA_HEAD_SEED = 20240611


def load_tokenizer(path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    eos = "<|endoftext|>"
    pad = None
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(cfg_path):
        cfg = json.load(open(cfg_path, encoding="utf-8"))
        eos = _tok_str(cfg.get("eos_token")) or eos
        pad = _tok_str(cfg.get("pad_token"))
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise SystemExit(f"eos token {eos!r} is not in {path}")
    pad_id = tok.token_to_id(pad) if pad else eos_id
    return tok, eos_id, eos_id if pad_id is None else pad_id


def _tok_str(v):
    return v.get("content") if isinstance(v, dict) else v


def make_batch(tok, eos_id, pad_id, rows):
    """TRL layout: rows 0..n chosen, n..2n rejected; prompt + answer + eos, right padded."""
    seqs, prompt_lens = [], []
    for key in ("chosen", "rejected"):
        for r in rows:
            p = tok.encode(r["prompt"], add_special_tokens=False).ids
            a = tok.encode(r[key], add_special_tokens=False).ids
            seqs.append(p + a + [eos_id])
            prompt_lens.append(len(p))
    T = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((n, T), dtype=torch.int64)
    loss_mask = torch.zeros((n, T), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        loss_mask[i, prompt_lens[i]: len(s)] = 1.0
    prompt_last = torch.tensor(prompt_lens[: len(rows)], dtype=torch.int64) - 1
    seq_last = mask.sum(1) - 1
    return ids, mask, loss_mask, prompt_last, seq_last


def tied_groups(model):
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _get_parent(model, dotted):
    parts = dotted.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


def untie(model):
    """Give every tied alias its own Parameter (same value), so autograd reports per-use gradients."""
    for names in tied_groups(model):
        for name in names[1:]:
            mod, attr = _get_parent(model, name)
            setattr(mod, attr, torch.nn.Parameter(getattr(mod, attr).detach().clone()))


def embedding_params(model):
    return {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}


def consumers(graph, nested=False):
    """tensor name -> nodes reading it; with nested, also the nodes of subgraphs (a merged decoder's
    If branches read the main graph's initializers by name)."""
    out = {}
    for node in graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
        if nested:
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
                    for name, nodes in consumers(g, nested=True).items():
                        out.setdefault(name, []).extend(nodes)
    return out


def uses_as_embedding(name, cons, depth=0):
    """True when the initializer reaches a Gather as its data input (an embedding lookup)."""
    for node in cons.get(name, []):
        if node.op_type == "Gather" and node.input[0] == name:
            return True
        if depth < 2 and node.op_type in ("Identity", "Cast"):
            if uses_as_embedding(node.output[0], cons, depth + 1):
                return True
    return False


def map_initializers(proto, model, base_dir):
    """ONNX initializer -> PyTorch parameter (by name, then by exact value, then transposed value)."""
    params = {n: p.detach().cpu() for n, p in model.named_parameters(remove_duplicate=False)}
    groups = tied_groups(model)
    emb = embedding_params(model)
    cons = consumers(proto.graph, nested=True)
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    mapping, non_param = {}, []
    claimed = set()
    inits = [(t.name, numpy_helper.to_array(t, base_dir=base_dir)) for t in proto.graph.initializer]

    def same(a, t):
        return tuple(a.shape) == tuple(t.shape) and np.array_equal(a, t.to(torch.float32).numpy()
                                                                   if a.dtype == np.float32 else t.numpy())

    for iname, arr in inits:
        if arr.dtype.kind != "f":
            continue
        cands = []
        for pname, p in params.items():
            if p.dim() == arr.ndim and same(arr, p):
                cands.append((pname, False))
            elif p.dim() == 2 and arr.ndim == 2 and same(arr, p.t()):
                cands.append((pname, True))
        if not cands:
            # an exporter may constant-fold `c + weight` (Gemma's RMSNorm scales by 1 + w): the initializer
            # then is the parameter plus a constant offset; its gradient is the parameter's gradient
            for pname, p in params.items():
                if tuple(p.shape) != arr.shape or arr.size < 2 or p.dtype != torch.float32:
                    continue
                diff = arr.astype(np.float64) - p.numpy()
                if np.ptp(diff) < 1e-6 and abs(diff.mean()) > 1e-6:
                    c = float(np.round(diff.mean(), 6))
                    if np.array_equal(arr, (p + c).numpy()):
                        cands.append((pname, False, c))
        if cands and len(cands[0]) == 3:
            pname, _, c = ([x for x in cands if x[0] not in claimed] or cands)[0]
            mapping[iname] = {"parameter": pname, "transposed": False, "offset": c}
            claimed.add(pname)
            continue
        if not cands:
            bname = iname[2:] if iname.startswith("m.") else iname
            if bname in buffers or arr.size > 1:
                non_param.append(iname)
            continue
        # 1. exact name match (m.<param>), 2. parameters not yet claimed, 3. tied aliases by use
        by_name = [c for c in cands if "m." + c[0] == iname]
        if by_name:
            choice = by_name[0]
        else:
            free = [c for c in cands if c[0] not in claimed] or cands
            is_emb = uses_as_embedding(iname, cons)
            pref = [c for c in free if (c[0] in emb) == is_emb]
            choice = (pref or free)[0]
        mapping[iname] = {"parameter": choice[0], "transposed": choice[1]}
        claimed.add(choice[0])
    unique = []
    seen = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(n)
    group_of = {n: g for g in groups for n in g}
    missing = []
    for n in unique:
        names = group_of.get(n, [n])
        if not any(nn in claimed for nn in names):
            missing.append(n)
    # a tied parameter stored once in ONNX but used both as embedding and as lm_head: its gradient is
    # the sum over the uses (reported via "tied_uses")
    for iname, m in mapping.items():
        g = group_of.get(m["parameter"])
        if g and not any(n in claimed for n in g if n != m["parameter"]):
            m["tied_uses"] = list(g)
    return mapping, non_param, missing


def dpo_losses(logits, hidden, ids, loss_mask, prompt_last, seq_last, w, b, ref):
    n = ids.shape[0] // 2
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    policy = (logp * loss_mask[:, 1:]).sum(1)
    margin = (policy[:n] - policy[n:]) - (ref[:n] - ref[n:])
    rows = torch.arange(n)
    beta = torch.nn.functional.softplus(hidden[rows, prompt_last] @ w + b)
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    allrows = torch.arange(2 * n)
    beta_seq = torch.nn.functional.softplus(hidden[allrows, seq_last] @ w + b)
    m_seq = beta_seq[:n] * (policy[:n] - ref[:n]) - beta_seq[n:] * (policy[n:] - ref[n:])
    loss_seq = -torch.nn.functional.logsigmoid(m_seq).mean()
    loss_fixed = -torch.nn.functional.logsigmoid(BETA_FIXED * margin).mean()
    return policy, beta, loss, beta_seq, loss_seq, loss_fixed


def beta_head(hidden_size, seed=BETA_HEAD_SEED):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden_size, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(hidden_size))
    # softplus(b) = 0.1: the head starts near the usual DPO beta
    b = torch.tensor([math.log(math.expm1(BETA_FIXED))], dtype=torch.float64)
    return w, b


def golden(model, onnx_path, exporter_desc, test_jsonl, tokenizer_path, pairs, source, check):
    out_dir = os.path.dirname(onnx_path)
    proto = onnx.load(onnx_path, load_external_data=True)
    base_dir = out_dir
    tok, eos_id, pad_id = load_tokenizer(tokenizer_path)
    with open(test_jsonl, encoding="utf-8") as f:
        rows = [json.loads(l) for l in f if l.strip()][:pairs]
    for r in rows:
        if not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise SystemExit(f"{test_jsonl}: the golden batch needs standard-format rows {{prompt, chosen, rejected}}")
    ids, mask, loss_mask, prompt_last, seq_last = make_batch(tok, eos_id, pad_id, rows)
    vocab = model.config.get_text_config().vocab_size
    if int(ids.max()) >= vocab:
        raise SystemExit(f"tokenizer ids reach {int(ids.max())} but the model's vocab is {vocab}")

    mapping, non_param, missing = map_initializers(proto, model, base_dir)
    groups = tied_groups(model)

    # ---- float64 PyTorch, untied aliases, no padding_idx gradient masking (ONNX Gather has none) ----
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    untie(m64)
    for mod in m64.modules():
        if isinstance(mod, torch.nn.Embedding):
            mod.padding_idx = None
    lm_head = m64.get_output_embeddings()
    captured = {}
    h = lm_head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("hidden", args[0]))
    params64 = dict(m64.named_parameters())
    logits = LogitsOnly(m64)(ids, mask)
    h.remove()
    hidden = captured["hidden"]
    hidden_size = hidden.shape[-1]
    w, b = beta_head(hidden_size)
    w.requires_grad_(True)
    b.requires_grad_(True)
    with torch.no_grad():
        logp0 = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        ref = (logp0 * loss_mask[:, 1:].double()).sum(1) + torch.linspace(-1.0, 1.0, ids.shape[0],
                                                                            dtype=torch.float64)
    policy, beta, loss, beta_seq, loss_seq, loss_fixed = dpo_losses(
        logits, hidden, ids, loss_mask.double(), prompt_last, seq_last, w, b, ref)

    names = list(params64)
    plist = [params64[n] for n in names]
    g_loss = torch.autograd.grad(loss, plist + [w, b], retain_graph=True, allow_unused=True)
    g_seq = torch.autograd.grad(loss_seq, [w, b], retain_graph=True)
    g_fixed = torch.autograd.grad(loss_fixed, plist, retain_graph=True, allow_unused=True)

    def per_init(grads):
        by_param = {n: (g if g is not None else torch.zeros_like(params64[n])) for n, g in zip(names, grads)}
        out = {}
        for iname, m in mapping.items():
            uses = m.get("tied_uses", [m["parameter"]])
            g = sum(by_param[u] for u in uses)
            out[iname] = g.t() if m["transposed"] else g
        return out

    grads = per_init(g_loss[: len(names)])
    grads_fixed = per_init(g_fixed)
    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    pos = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    if getattr(model.config, "model_type", "") == "opt":  # OPT derives positions from the mask
        pos = (torch.cumsum(mask, 1) * mask - 1).contiguous()
    tensors = {
        "input_ids": ids, "attention_mask": mask, "position_ids": pos, "loss_mask": loss_mask,
        "prompt_last_index": prompt_last, "sequence_last_index": seq_last,
        "logits": f32(logits), "hidden": f32(hidden), "policy_logps": f32(policy), "ref_logps": f32(ref),
        "beta_head.weight": f32(w), "beta_head.bias": f32(b), "beta": f32(beta), "loss": f32(loss.reshape(1)),
        "grad/beta_head.weight": f32(g_loss[-2]), "grad/beta_head.bias": f32(g_loss[-1]),
        "beta_sequence": f32(beta_seq), "loss_sequence": f32(loss_seq.reshape(1)),
        "grad_sequence/beta_head.weight": f32(g_seq[0]), "grad_sequence/beta_head.bias": f32(g_seq[1]),
        "loss_fixed_beta": f32(loss_fixed.reshape(1)),
    }
    for iname, g in grads.items():
        tensors["grad/" + iname] = f32(g)
    for iname, g in grads_fixed.items():
        tensors["grad_fixed_beta/" + iname] = f32(g)

    # ---- ORT vs PyTorch float32 on this batch ----
    sess = ort_session(onnx_path)
    ort_logits = sess.run(["logits"], lm_feeds(sess, ids.numpy(), mask.numpy()))[0]
    with torch.no_grad():
        pt32 = LogitsOnly(model)(ids, mask).float().numpy()
    ort_err = float(np.abs(ort_logits.astype(np.float32) - pt32).max())
    f64_err = float(np.abs(ort_logits.astype(np.float64) - logits.detach().numpy()).max())
    log(f"golden: ORT vs PyTorch float32 max |logit diff| {ort_err:.3g}; vs float64 {f64_err:.3g}")

    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(out_dir, "golden.safetensors"))
    os.chmod(os.path.join(out_dir, "golden.safetensors"), 0o644)
    import transformers
    meta = {
        "pairs": len(rows),
        "rows": "rows 0..pairs are chosen, rows pairs..2*pairs the rejected answers to the same prompts",
        "texts": rows,
        "hidden_size": int(hidden_size),
        "vocab_size": int(vocab),
        "initializer_to_parameter": mapping,
        "non_parameter_float_initializers": non_param,
        "parameters_without_initializer": missing,
        "tied_in_pytorch": groups,
        "inputs": [i.name for i in proto.graph.input],
        "ort_vs_pytorch_max_abs_logit_error": ort_err,
        "exporter": exporter_desc,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__},
        "source": source,
    }
    with open(os.path.join(out_dir, "golden.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    log(f"golden: loss {loss.item():.6f} loss_sequence {loss_seq.item():.6f} loss_fixed_beta "
        f"{loss_fixed.item():.6f}; {len(mapping)} parameter initializers, non-parameter float "
        f"initializers {non_param}, parameters without initializer {missing}, tied {groups}")
    if missing:
        log(f"WARNING: parameters without an ONNX initializer: {missing}")
    if check:
        check_gradients(proto, ids, mask, loss_mask, prompt_last, seq_last, ref, w.detach(), b.detach(),
                        mapping, grads, grads_fixed, loss.item(), loss_fixed.item())


def _find_hidden_name(proto, mapping):
    """The activation that the lm_head MatMul/Gemm multiplies (the lm_head initializer's partner)."""
    lm = [i for i, m in mapping.items() if m["parameter"].endswith("lm_head.weight") or
          (m.get("tied_uses") and any(u.endswith("lm_head.weight") for u in m["tied_uses"]))]
    cons = consumers(proto.graph)
    for iname in lm:
        frontier = [iname]
        for _ in range(3):
            nxt = []
            for name in frontier:
                for node in cons.get(name, []):
                    if node.op_type in ("MatMul", "Gemm"):
                        other = [x for x in node.input[:2] if x != name]
                        if other:
                            return other[0]
                    if node.op_type in ("Transpose", "Identity", "Cast"):
                        nxt.append(node.output[0])
            frontier = nxt
    return None


def check_gradients(proto, ids, mask, loss_mask, prompt_last, seq_last, ref, w, b, mapping, grads,
                    grads_fixed, loss_value, loss_fixed_value):
    """Directional central differences of the ONNX graph itself (onnxruntime, float32 weights) along each
    golden gradient: d/de L(theta + e * g/|g|) should equal |g|. Checks the initializer mapping and the
    tied-copy split independently of PyTorch."""
    hidden_name = _find_hidden_name(proto, mapping)
    inits = {t.name: t for t in proto.graph.initializer}
    base = {n: numpy_helper.to_array(inits[n]).astype(np.float64) for n in mapping}
    feeds = lm_feeds(ort_session(proto), ids.numpy(), mask.numpy())
    lm = loss_mask.double()
    refd = ref.double()

    def run(modified):
        p = copy.deepcopy(proto)
        for t in p.graph.initializer:
            if t.name in modified:
                t.CopyFrom(numpy_helper.from_array(modified[t.name].astype(np.float32), t.name))
        outs = ["logits"] + ([hidden_name] if hidden_name else [])
        res = ort_session(p, extra_outputs=[hidden_name] if hidden_name else []).run(outs, feeds)
        logits = torch.from_numpy(res[0].astype(np.float64))
        hidden = torch.from_numpy(res[1].astype(np.float64)) if hidden_name else None
        with torch.no_grad():
            if hidden is None:
                hidden = torch.zeros(*logits.shape[:2], w.shape[0], dtype=torch.float64)
            _, _, loss, _, _, loss_fixed = dpo_losses(logits, hidden, ids, lm, prompt_last, seq_last,
                                                      w, b, refd)
        return loss.item(), loss_fixed.item()

    l0, lf0 = run({})
    if hidden_name:
        log(f"check: ORT float32 loss {l0:.6f} (float64 {loss_value:.6f}), fixed-beta {lf0:.6f} "
            f"(float64 {loss_fixed_value:.6f}); hidden tensor: {hidden_name}")
    else:
        log(f"check: ORT float32 fixed-beta loss {lf0:.6f} (float64 {loss_fixed_value:.6f}); the hidden state is not "
            f"a main-graph tensor (e.g. inside an If branch), so only the fixed-beta gradients are checked")
    worst = 0.0
    checked = skipped = 0
    kinds = [("fixed", grads_fixed, 1)] + ([("beta", grads, 0)] if hidden_name else [])
    for kind, gdict, which in kinds:
        for iname in mapping:
            g = gdict[iname].detach().double().numpy()
            gn = float(np.linalg.norm(g))
            if gn == 0.0:
                continue
            scale = max(1e-3, float(np.abs(base[iname]).max()))
            # a step that moves the loss by ~1e-5 (well above float32 rounding), within [1%, 30%] of the
            # tensor's largest entry
            eps = min(max(5e-6 / gn, 1e-2 * scale), 0.3 * scale)
            if 2 * eps * gn < 1e-7:  # the loss would change less than float32 logits can resolve
                skipped += 1
                if os.environ.get("EXPORT_HF_VERBOSE"):
                    log(f"  {kind:5s} {iname:50s} |g| {gn:.4e} too small to check")
                continue
            d = g / gn
            lp = run({iname: base[iname] + eps * d})[which]
            lmn = run({iname: base[iname] - eps * d})[which]
            fd = (lp - lmn) / (2 * eps)
            rel = abs(fd - gn) / gn
            worst = max(worst, rel)
            checked += 1
            flag = "" if rel < 0.05 else "   <-- MISMATCH"
            if flag or os.environ.get("EXPORT_HF_VERBOSE"):
                log(f"  {kind:5s} {iname:50s} |g| {gn:.4e} finite-diff {fd:.4e} rel {rel:.2e}{flag}")
    log(f"check: {checked} directional derivatives of the ONNX graph agree with the golden gradients, worst "
        f"relative error {worst:.3g} ({skipped} gradients too small to resolve were skipped)")
    if worst >= 0.05:
        raise SystemExit("FAILED: golden gradients disagree with finite differences of the ONNX graph")


# --------------------------------------------------------------------------------------------------------
# The Hugging Face name map (hf_export.json): how `betadpo export --hf` writes a checkpoint
# --------------------------------------------------------------------------------------------------------
HF_MAP_FILE = "hf_export.json"
HF_MAP_FORMAT = "betadpo-hf-map"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _saved_checkpoint(model, tmp):
    """What save_pretrained writes: config, generation config, and the tensors under their checkpoint
    names (tied weights once, legacy names restored by transformers' conversion mapping)."""
    from safetensors import safe_open
    model.save_pretrained(tmp)
    config = json.load(open(os.path.join(tmp, "config.json"), encoding="utf-8"))
    gen_path = os.path.join(tmp, "generation_config.json")
    gen = json.load(open(gen_path, encoding="utf-8")) if os.path.exists(gen_path) else None
    index = os.path.join(tmp, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for f in files:
        with safe_open(os.path.join(tmp, f), "pt") as st:
            for key in st.keys():
                tensors[key] = st.get_tensor(key)
    return config, gen, tensors


def hf_map(model, proto, base_dir):
    """For every tensor of the model's Hugging Face checkpoint: the ONNX initializer holding it
    (`transposed` when the exporter stored the transpose; `offset` when it folded `c + weight`, so
    the checkpoint's tensor is initializer - c) and the initializers of its tied copies. Raises
    SystemExit naming the tensor when one has no initializer."""
    mapping, _, missing = map_initializers(proto, model, base_dir)
    if missing:
        raise SystemExit(f"parameters without an ONNX initializer: {', '.join(missing)}")
    group_of = {n: g for g in tied_groups(model) for n in g}
    params = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    inits_of = {}
    for iname, m in mapping.items():
        for use in m.get("tied_uses", [m["parameter"]]):
            inits_of.setdefault(use, []).append((iname, m))
    arrays = {t.name: t for t in proto.graph.initializer}
    with tempfile.TemporaryDirectory() as tmp:
        config, gen, saved = _saved_checkpoint(model, tmp)
    entries, claimed = [], set()
    for key, tensor in saved.items():
        same = lambda n: tuple(params[n].shape) == tuple(tensor.shape) and torch.equal(params[n].to(tensor.dtype), tensor)
        if key in params and same(key):
            pname = key
        else:  # renamed on save (e.g. GPT-NeoX's embed_out): the one unclaimed parameter with its value
            found = [n for n in params if n not in claimed and same(n)]
            if len({id(params[n]) for n in found}) != 1:
                raise SystemExit(f"checkpoint tensor {key}: {len(found)} parameters hold its value; cannot map it")
            pname = found[0]
        claimed.update(group_of.get(pname, [pname]))
        uses = [pname] + [n for n in group_of.get(pname, []) if n != pname]
        inits = [im for u in uses for im in inits_of.get(u, [])]
        if not inits:
            raise SystemExit(f"checkpoint tensor {key} ({pname}): no ONNX initializer holds it")
        (iname, m), copies = inits[0], [im for im in inits[1:] if im[0] != inits[0][0]]
        value = numpy_helper.to_array(arrays[iname], base_dir=base_dir).astype(np.float64)
        value = (value.T if m["transposed"] else value) - m.get("offset", 0.0)
        want = tensor.to(torch.float64).numpy()
        exact = "offset" not in m
        if value.shape != want.shape or not (np.array_equal(value, want) if exact else np.allclose(value, want, atol=1e-6)):
            raise SystemExit(f"checkpoint tensor {key}: initializer {iname} does not hold its value")
        entry = {"name": key, "initializer": iname, "transposed": m["transposed"], "shape": list(tensor.shape),
                 "dtype": SAFETENSORS_DTYPES[tensor.dtype]}
        if "offset" in m:
            entry["offset"] = m["offset"]
        if copies:
            entry["tied_copies"] = [{"initializer": i, "transposed": c["transposed"]} for i, c in copies]
        entries.append(entry)
    return {
        "format": HF_MAP_FORMAT,
        "format_version": 1,
        "about": "written by scripts/tools/export_hf.py: the model's Hugging Face checkpoint tensors (as save_pretrained "
                 "names them) and the ONNX initializers holding them, for `betadpo export --hf`",
        "lm_head_input": _find_hidden_name(proto, mapping),
        "config": config,
        "generation_config": gen,
        "tensors": entries,
    }


def write_hf_map(model, onnx_path, source_model=None):
    """Writes hf_export.json beside the ONNX model; a model that cannot be mapped gets none (with the
    reason), since everything but `export --hf` works without it. `source_model` (the --model given:
    a Hub id, or a local folder made absolute) is what a PEFT adapter from `export --hf` names as its base."""
    out_dir = os.path.dirname(onnx_path)
    path = os.path.join(out_dir, HF_MAP_FILE)
    if os.path.exists(path):
        os.remove(path)
    proto = onnx.load(onnx_path, load_external_data=True)
    try:
        m = hf_map(model, proto, out_dir)
    except SystemExit as e:
        log(f"note: no {HF_MAP_FILE} (betadpo export --hf will not work for this model): {e}")
        return None
    if source_model:
        m["source_model"] = os.path.abspath(source_model) if os.path.isdir(source_model) else source_model
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(m, f, indent=1)
        f.write("\n")
    log(f"wrote {path}: {len(m['tensors'])} checkpoint tensors mapped to ONNX initializers")
    return path


# --------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face hub id or local directory of a causal LM")
    src.add_argument("--tiny", choices=sorted(TINY_FAMILIES), help="build a tiny random model of this family")
    src.add_argument("--shape", help=f"build a random model of this shape: {', '.join(SHAPES)} or a config.json")
    ap.add_argument("--out", required=True, help="output directory (model.onnx [+ model.onnx.data])")
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default=None,
                    help="default: dynamo (torchscript for --tiny gpt2/opt)")
    ap.add_argument("--opset", type=int, default=None, help="default 18 (dynamo) / 17 (torchscript)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                    help="auto: dynamo always writes model.onnx.data; torchscript only past 2 GB")
    ap.add_argument("--seed", type=int, default=0, help="seed of --tiny and --shape models")
    ap.add_argument("--gguf-file", default=None, help="load --model from this GGUF file (dequantized)")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--tolerance", type=float, default=None, help="max |logit diff| (default 1e-4 for float32)")
    ap.add_argument("--golden", action="store_true", help="also write golden.safetensors + golden.json")
    ap.add_argument("--test-jsonl", default=os.path.join(QUICKSTART, "test.jsonl"))
    ap.add_argument("--tokenizer", default=os.path.join(QUICKSTART, "tokenizer.json"))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--no-check", action="store_true", help="skip the finite-difference check of --golden")
    ap.add_argument("--save-tokenizer", action="store_true",
                    help="also save the --model's tokenizer files into --out")
    ap.add_argument("--no-hf-map", action="store_true", help=f"do not write {HF_MAP_FILE}")
    ap.add_argument("--map-only", action="store_true",
                    help=f"keep --out/model.onnx as it is (checked against the model) and write only {HF_MAP_FILE}")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.tiny:
        model = build_tiny(args.tiny, tiny_seed(args.tiny, args.seed), args.dtype)
        exporter = args.exporter or DEFAULT_EXPORTER.get(args.tiny, "dynamo")
        source = f"tiny random {args.tiny} (scripts/tools/export_hf.py --tiny {args.tiny} --seed {args.seed})"
    elif args.shape:
        model = build_random(shape_config(args.shape), args.seed, args.dtype)
        exporter = args.exporter or "dynamo"
        source = f"random {args.shape} (scripts/tools/export_hf.py --shape {args.shape} --seed {args.seed})"
    else:
        model = load_pretrained(args.model, args.dtype, args.gguf_file, args.trust_remote_code)
        exporter = args.exporter or "dynamo"
        source = args.model + (f" ({args.gguf_file})" if args.gguf_file else "")
    nparams = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log(f"model: {source}: {type(model).__name__}, {nparams:,} parameters, {args.dtype}; exporter {exporter}")

    if args.map_only:
        if args.golden:
            raise SystemExit("--map-only writes no goldens; drop --golden")
        path = os.path.join(args.out, "model.onnx")
        if not os.path.exists(path):
            raise SystemExit(f"--map-only: {path} does not exist")
    else:
        path, opset = export(model, args.out, exporter, args.opset, args.external_data)
        sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
                 if f.startswith("model.onnx")}
        log(f"exported {path} ({', '.join(f'{k}: {v:,} bytes' for k, v in sorted(sizes.items()))})")

    if args.save_tokenizer and args.model:
        try:
            from transformers import AutoTokenizer
            kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
            AutoTokenizer.from_pretrained(args.model, **kw).save_pretrained(args.out)
            # transformers 5 writes the chat template to chat_template.jinja; also keep it in
            # tokenizer_config.json, where most readers (and older transformers) look for it
            cfg_path = os.path.join(args.out, "tokenizer_config.json")
            jinja = os.path.join(args.out, "chat_template.jinja")
            if os.path.exists(cfg_path) and os.path.exists(jinja):
                cfg = json.load(open(cfg_path, encoding="utf-8"))
                if "chat_template" not in cfg:
                    cfg["chat_template"] = open(jinja, encoding="utf-8").read()
                    with open(cfg_path, "w", encoding="utf-8") as f:
                        json.dump(cfg, f, indent=2, ensure_ascii=False)
                        f.write("\n")
        except Exception as e:  # a model without a tokenizer is still exportable
            log(f"note: could not save the tokenizer: {e}")

    tol = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 5e-2)
    vocab = model.config.get_text_config().vocab_size
    batches = [example_inputs(vocab, batch=3, seq=13, seed=1), example_inputs(vocab, batch=1, seq=5, seed=2)]
    if args.golden:
        tok, eos_id, pad_id = load_tokenizer(args.tokenizer)
        rows = [json.loads(l) for l in open(args.test_jsonl, encoding="utf-8") if l.strip()][: args.pairs]
        batches.insert(0, make_batch(tok, eos_id, pad_id, rows)[:2])
    verify(model, path, batches, tol)
    if not args.no_hf_map:
        write_hf_map(model, path, None if args.gguf_file else args.model)

    if args.golden:
        if args.dtype != "float32":
            raise SystemExit("--golden needs --dtype float32")
        golden(model, path, describe_exporter(exporter, opset), args.test_jsonl, args.tokenizer, args.pairs,
               source, check=not args.no_check)
    log("done")


if __name__ == "__main__":
    main()
