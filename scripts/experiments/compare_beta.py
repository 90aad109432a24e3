#!/usr/bin/env python3
"""Runs beta methods x seeds with betadpo on one model and data set; writes one table and plots.

Each method is a set of `build-graph` flags plus `train` flags. Every run evaluates on the held-out
set by group (`--group-by`, default `regime`) every `--eval-every` steps; the table holds, per method
and group, the mean over seeds (and min-max) of: reward accuracy, beta, drift (mean |policy - reference|
log-prob of an answer) at the last evaluation, and how much beta changed between the last two
evaluations, and (`--kl`, the default) the KL of the policy from the reference per answer token on the
held-out answers (scripts/tools/heldout_kl.py, on the exported final and initial models; needs numpy,
onnxruntime and tokenizers). With matplotlib installed it also draws beta per group over steps and drift against
accuracy (and KL against accuracy). Stdlib only with `--no-kl`; not part of CI.

    python3 scripts/experiments/compare_beta.py --model ../shared/fixtures/tiny-llama-dynamo/model.onnx \\
        --data ../shared/fixtures/prefs/train.jsonl --eval-data ../shared/fixtures/prefs/test.jsonl \\
        --tokenizer ../shared/fixtures/tokenizer/tokenizer.json --steps 600 --seeds 42,1,2,3 \\
        --methods learned,fixed,beta-dpo,epsilon-dpo --out runs/compare
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys

from betadpo_py.paths import ROOT, script

# name -> (build-graph flags, train flags)
METHODS = {
    "learned": ([], []),
    # the learned head differentiated through its read of the hidden state (the default before it was detached)
    "joint": (["--head-gradient", "joint"], []),
    "fixed": (["--fixed-beta", "0.1"], []),
    # Wu et al. 2024, with the reference code's example settings (beta_0 0.1, alpha 0.6, rho 0.2)
    "beta-dpo": (["--beta-method", "beta-dpo"], []),
    # Lee et al. 2025, with the reference code's default epsilon 0.01, from beta 0.1 (--beta-init);
    # the train graph holds a frozen copy of the model as the reference (twice the weights' memory)
    "epsilon-dpo": (["--beta-method", "epsilon-dpo", "--epsilon", "0.01", "--beta-init", "0.1"], []),
}


def run(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def evals(run_dir):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    return [r for r in recs if "eval/loss" in r]


def train_records(run_dir):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    return [r for r in recs if "loss" in r and "eval/loss" not in r]


def heldout_kl(a, art, rd, lora):
    """Per-group KL(policy || reference) on the held-out answers, cached in the run directory."""
    cached = os.path.join(rd, "heldout_kl.json")
    if not os.path.exists(cached):
        tmp = os.path.join(a.out, "kl-models")
        os.makedirs(tmp, exist_ok=True)
        merge = ["--merge"] if lora else []
        pol, ref = os.path.join(tmp, "policy.onnx"), os.path.join(tmp, "reference.onnx")
        run([a.betadpo, "export", "--run", rd, "--out", pol, *merge], os.path.join(rd, "export-policy.log"))
        run([a.betadpo, "export", "--artifacts", art, "--out", ref, *merge], os.path.join(rd, "export-reference.log"))
        run([sys.executable, script("tools", "heldout_kl.py"), "--policy", pol,
             "--reference", ref, "--data", a.eval_data, "--tokenizer", a.tokenizer, "--group-by", a.group_by,
             "--json", cached], os.path.join(rd, "heldout_kl.log"))
        shutil.rmtree(tmp)  # exported models are as large as the model: keep only the numbers
    return json.load(open(cached))


def summary(values):
    if not values:
        return "-"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ({min(values):.3f}-{max(values):.3f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betadpo", default=str(ROOT / "target" / "release" / "betadpo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="learned,fixed", help=f"comma-separated, of {sorted(METHODS)}")
    ap.add_argument("--seeds", default="42,1,2,3")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--group-by", default="regime")
    ap.add_argument("--build-flags", default="", help="extra build-graph flags for every method")
    ap.add_argument("--train-flags", default="--lr 1e-3", help="extra train flags for every method")
    ap.add_argument("--kl", action=argparse.BooleanOptionalAction, default=True,
                    help="measure KL(policy || reference) per token on the held-out answers (exports both models)")
    ap.add_argument("--method", action="append", default=[], metavar="NAME=BUILD_FLAGS|TRAIN_FLAGS",
                    help="define a method on the fly, e.g. 'reg1=--beta-reg 1|--head-lr 1e-3'")
    a = ap.parse_args()
    for spec in a.method:
        name, flags = spec.split("=", 1)
        build, _, train = flags.partition("|")
        METHODS[name] = (build.split(), train.split())
    if a.kl:
        missing = [m for m in ("numpy", "onnxruntime", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            sys.exit(f"--kl needs {', '.join(missing)} (pip install {' '.join(missing)}), or pass --no-kl")
    methods = a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.out, exist_ok=True)
    results = {}  # method -> seed -> run directory
    kls = {}  # method -> seed -> group -> held-out KL numbers
    for m in methods:
        build, train = METHODS[m]
        art = os.path.join(a.out, f"art-{m}")
        if not os.path.exists(os.path.join(art, "manifest.json")):
            run([a.betadpo, "build-graph", "--model", a.model, "--out", art, "--quiet", *build, *a.build_flags.split()],
                os.path.join(a.out, f"build-{m}.log"))
        for seed in seeds:
            rd = os.path.join(a.out, f"run-{m}-{seed}")
            if not os.path.exists(os.path.join(rd, "final")):
                if os.path.exists(rd):
                    shutil.rmtree(rd)
                run([a.betadpo, "train", "--artifacts", art, "--data", a.data, "--eval-data", a.eval_data,
                     "--tokenizer", a.tokenizer, "--out", rd, "--max-steps", str(a.steps), "--eval-every",
                     str(a.eval_every), "--group-by", a.group_by, "--seed", str(seed), "--quiet",
                     *a.train_flags.split(), *train], os.path.join(a.out, f"train-{m}-{seed}.log"))
            results.setdefault(m, {})[seed] = rd
            if a.kl:
                kls.setdefault(m, {})[seed] = heldout_kl(a, art, rd, "--lora-rank" in build + a.build_flags.split())
            print(f"{m} seed {seed}: done", file=sys.stderr)

    groups = sorted({k.split("/")[-1] for m in results for rd in results[m].values()
                     for k in evals(rd)[-1] if k.startswith("eval/rewards/accuracies/")})
    lines = [f"{a.steps} steps, seeds {a.seeds}, train flags `{a.train_flags}`", ""]
    head = "| method | group | accuracy | beta | drift | KL per answer token | beta change, last two evals | ratio to first group's beta, worst seed |"
    lines += [head, "|" + "---|" * 8]
    for m in methods:
        for g in groups:
            acc, beta, drift, change, ratio = [], [], [], [], []
            kl = [kls[m][seed][g]["kl_per_token"] for seed in results[m] if g in kls.get(m, {}).get(seed, {})]
            for rd in results[m].values():
                ev = evals(rd)
                last, prev = ev[-1], ev[-2] if len(ev) > 1 else None
                acc.append(last[f"eval/rewards/accuracies/{g}"])
                beta.append(last[f"eval/beta/mean/{g}"])
                drift.append(last[f"eval/drift/abs_logratio/{g}"])
                if prev:
                    change.append(abs(last[f"eval/beta/mean/{g}"] / prev[f"eval/beta/mean/{g}"] - 1))
                ratio.append(last[f"eval/beta/mean/{groups[0]}"] / last[f"eval/beta/mean/{g}"])
            lines.append(f"| {m} | {g} | {summary(acc)} | {summary(beta)} | {summary(drift)} | {summary(kl)} | "
                         f"{max(change):.1%} | {min(ratio):.2f} |")
    # Stability over training: loss spikes after step 20, mean beta ratio between 20-step windows.
    # A batch of 8 pairs with coin-flip labels can cost more than 1.5 ln 2 under any beta (standard DPO
    # too), so the table also counts such steps and gives the worst 20-step moving average.
    lines += ["", "| method | seed | max loss after step 20 (/ ln 2) | steps after 20 above 1.5 ln 2 | max 20-step mean loss after step 20 (/ ln 2) | max ratio of mean beta, consecutive 20-step windows |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        for seed, rd in results[m].items():
            tr = train_records(rd)
            late = [r["loss"] for r in tr if r["step"] > 20]
            above = sum(1 for x in late if x > 1.5 * 0.6931)
            moving = [statistics.mean(late[i:i + 20]) for i in range(0, len(late) - 19)]
            betas = [r.get("beta/mean") for r in tr]
            win = [statistics.mean(betas[i:i + 20]) for i in range(0, len(betas) - 19, 20) if None not in betas[i:i + 20]]
            ratios = [max(x / y, y / x) for x, y in zip(win, win[1:])]
            lines.append(f"| {m} | {seed} | {max(late) / 0.6931:.2f} | {above} of {len(late)} | {max(moving) / 0.6931 if moving else float('nan'):.2f} | "
                         f"{max(ratios) if ratios else float('nan'):.2f} |")
    table = "\n".join(lines)
    open(os.path.join(a.out, "table.md"), "w").write(table + "\n")
    print(table)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for g in groups:
            for i, rd in enumerate(results[m].values()):
                ev = evals(rd)
                ax.plot([r["step"] for r in ev], [r[f"eval/beta/mean/{g}"] for r in ev], color=f"C{groups.index(g)}",
                        label=g if i == 0 else None, alpha=0.7)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out beta")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "beta_over_steps.png"))

    def against_accuracy(x_of, xlabel, name):
        """Scatter of a per-run, per-group quantity against held-out accuracy, one point a seed."""
        fig, ax = plt.subplots(figsize=(5, 4))
        for mi, m in enumerate(methods):
            for g in groups:
                xs = [x_of(m, seed, rd, g) for seed, rd in results[m].items()]
                ys = [evals(rd)[-1][f"eval/rewards/accuracies/{g}"] for rd in results[m].values()]
                ax.scatter(xs, ys, marker="os^vD"[mi % 5], color=f"C{groups.index(g)}", label=f"{m} {g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out reward accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, name))

    against_accuracy(lambda m, seed, rd, g: evals(rd)[-1][f"eval/drift/abs_logratio/{g}"],
                     "drift |policy - reference| log-prob", "drift_vs_accuracy.png")
    if kls:
        against_accuracy(lambda m, seed, rd, g: kls[m][seed][g]["kl_per_token"],
                         "KL(policy || reference) per held-out answer token", "kl_vs_accuracy.png")


if __name__ == "__main__":
    main()
