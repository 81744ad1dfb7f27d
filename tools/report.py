"""The tables and figure of the toy's results, from the runs' files under one --out.

    python tools/report.py runs --preset cpu   # runs/cpu-report.md, runs/cpu-curves.png

Per seed: before_rl.json (chance, teacher, student before RL, premises), each rl-*/ run's
results.json and metrics.jsonl. Over seeds: mean ± sample std, and KEPO minus each baseline
seed by seed (one warm student and test set a seed). The figure needs matplotlib.

The verdicts follow the rule fixed in docs/RESULTS.md before the runs: the primary claim is
OOD accuracy, KEPO against each of GRPO, OPD and KDPO, by an exact paired sign-flip test
(two-sided, all 2^n sign assignments) with Holm's correction over the three; every other
comparison is exploratory (p unadjusted). Intervals: 95% t intervals of the mean difference.

The measures of the paper's three claims, fixed before the runs (docs/RESULTS.md):
- out-of-distribution accuracy: greedy, 200 test questions a modality (OOD, ID);
- training stability: a run's largest OOD-curve drop (max_drop), the final OOD's spread;
- coherent reasoning: the share of greedy completions whose <think> letter is the
  <answer>'s and whose option is the evidence stated (coherence/OOD, coherence/ID).
"""
import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

RUNS = ["rl-grpo", "rl-opd", "rl-kdpo", "rl-kepo", "rl-kepo-tau0", "rl-kepo-tau2",
        "rl-kepo-always"]
BASELINES = ["rl-grpo", "rl-opd", "rl-kdpo"]
PAIRED = {"OOD": "OOD", "ID": "ID", "max_drop": "largest OOD drop",
          "coherence/OOD": "coherence OOD", "coherence/ID": "coherence ID"}
PRIMARY = "OOD"  # the claim the rule tests, against each of BASELINES
ALPHA = 0.05  # family-wise level of the primary tests (Holm)
ABLATIONS = ["rl-kepo-tau0", "rl-kepo-tau2", "rl-kepo-always"]
PANELS = {"reward": "training reward", "cliff_groups": "groups with every sample wrong",
          "gate_frac": "gate fraction", "distill_loss": "distillation loss",
          "eval/OOD": "OOD accuracy (curve subset)"}

def max_drop(values):
    """The largest fall of a curve below its best point so far (0 if it never falls).

    >>> round(max_drop([0.4, 0.5, 0.3, 0.45, 0.2, 0.6]), 6), max_drop([0.1, 0.2, 0.3])
    (0.3, 0.0)
    """
    best, drop = float("-inf"), 0.0
    for v in values:
        best = max(best, v)
        drop = max(drop, best - v)
    return drop

def spread(values):
    return f"{statistics.stdev(values):.3f}" if len(values := list(values)) > 1 else ""

def mean_std(values):
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"

def read(path):
    """A JSON file's, or a JSON-lines file's, records; one line if damaged."""
    try:
        lines = Path(path).read_text().splitlines() if path.suffix == ".jsonl" else [
            Path(path).read_text()]
        return [json.loads(x) for x in lines]
    except (OSError, ValueError) as e:
        sys.exit(f"report.py: error: {path} is damaged ({type(e).__name__}): rerun it")

def collect(out, preset):
    """({seed: before_rl}, {run: {seed: results with the per-run measures}},
    {run: {seed: metrics}})."""
    befores, runs, curves = {}, {}, {}
    for path in sorted(Path(out).glob(f"{preset}-seed*/before_rl.json")):
        seed = int(path.parent.name.rsplit("-seed", 1)[1])
        befores[seed] = read(path)[0]
        for run in RUNS:
            folder = path.parent / run
            if not (folder / "results.json").exists():
                continue
            res, metrics = read(folder / "results.json")[0], read(folder / "metrics.jsonl")
            res["max_drop"] = max_drop([m["eval/OOD"] for m in metrics if "eval/OOD" in m])
            for key in ("gate_frac", "hint_groups", "hint_injected", "cliff_groups"):
                res[key] = statistics.mean(m.get(key, 0.0) for m in metrics)
            runs.setdefault(run, {})[seed] = res
            curves.setdefault(run, {})[seed] = metrics
    return befores, runs, curves

def table(head, rows):
    return [f"| {' | '.join(head)} |", "|---" * len(head) + "|"] + [
        f"| {' | '.join(map(str, r))} |" for r in rows] + [""]

def paired(runs, key, other, run="rl-kepo"):
    """KEPO minus `other` seed by seed on `key`: (mean ± std, seeds where KEPO is better:
    higher, or lower for a drop)."""
    seeds = sorted(set(runs.get(run, {})) & set(runs.get(other, {})))
    diffs = [runs[run][s][key] - runs[other][s][key] for s in seeds]
    better = sum(d < 0 if key == "max_drop" else d > 0 for d in diffs)
    return (mean_std(diffs), f"{better}/{len(diffs)}") if diffs else ("", "")

def sign_flip_p(diffs):
    """Exact two-sided paired sign-flip p: the share of the 2^n sign assignments
    whose |sum| reaches the observed one.

    >>> sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]), sign_flip_p([-2, -1, 1, 2])
    (0.0625, 1.0)
    """
    observed = abs(sum(diffs)) * (1 - 1e-9)  # a tie counts as extreme: floats
    signs = itertools.product((1, -1), repeat=len(diffs))
    hits = sum(abs(sum(s * d for s, d in zip(sign, diffs))) >= observed for sign in signs)
    return hits / 2 ** len(diffs)

def holm(ps):
    """Holm's step-down adjusted p values, in the order given.

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    adjusted, worst = [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=ps.__getitem__)):
        worst = max(worst, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = worst
    return adjusted

def t_interval(diffs):
    """The mean's 95% t interval, t from the normal quantile by its Cornish-Fisher
    expansion (to 4 decimals from 5 degrees of freedom; t(7) = 2.3646).

    >>> [round(x, 4) for x in t_interval([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])]
    [1.4522, 5.5478]
    """
    n, z = len(diffs), statistics.NormalDist().inv_cdf(0.975)
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    t = z + sum(term / (n - 1) ** k for k, term in enumerate(terms, 1))
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half

def verdict(mean, adjusted_p):
    """The rule's words for a primary comparison (KEPO minus a baseline).

    >>> verdict(0.03, 0.01), verdict(-0.02, 0.02), verdict(0.03, 0.08)
    ('holds', 'the reverse holds', 'not shown (p = 0.080)')
    """
    if adjusted_p >= ALPHA:
        return f"not shown (p = {adjusted_p:.3f})"
    return "holds" if mean > 0 else "the reverse holds"

def tests(runs, key, others, run="rl-kepo"):
    """Per other run: [other, mean, 95% interval, p] of `run` minus it, by seed."""
    rows = []
    for other in others:
        seeds = sorted(set(runs.get(run, {})) & set(runs.get(other, {})))
        diffs = [runs[run][s][key] - runs[other][s][key] for s in seeds]
        if len(diffs) > 1:
            low, high = t_interval(diffs)
            rows.append([other, statistics.mean(diffs), f"[{low:+.3f}, {high:+.3f}]",
                         sign_flip_p(diffs)])
    return rows

def report(out, preset):
    befores, runs, curves = collect(out, preset)
    if not befores:
        sys.exit(f"report.py: error: no {preset}-seed*/before_rl.json under {out}")
    seeds = sorted(befores)
    first = befores[seeds[0]]
    lines = [f"# {preset}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", ""]
    names = [p["premise"].split(" (")[0] for p in first["premises"]]
    lines += table(["premise (before RL)", *(f"seed {s}" for s in seeds)], [
        [name, *(f"{befores[s]['premises'][i]['value']:.3f}"
                 + " ✗" * (not befores[s]["premises"][i]["holds"]) for s in seeds)]
        for i, name in enumerate(names)])
    rows = {name: {s: befores[s]["rows"][name] for s in seeds} for name in first["rows"]}
    rows |= runs
    columns = [k for k in first["rows"]["chance"] if "/" not in k]
    lines += table(["run", "seeds", *columns], [
        [n, len(r), *(mean_std(x[c] for x in r.values()) for c in columns)]
        for n, r in rows.items()])
    qtypes = [k for k in first["rows"]["chance"] if k.startswith("q/")]
    lines += table(["run", *(q[2:] for q in qtypes)], [
        [n, *(mean_std(x[q] for x in r.values()) for q in qtypes)] for n, r in rows.items()])
    methods = {n: r for n, r in rows.items()
               if n.startswith("rl-") or n == "student (before RL)"}
    claims = ("max_drop", "coherence/OOD", "coherence/ID")
    lines += table(["run", "OOD", "spread of final OOD", "largest OOD drop",
                    "coherence OOD", "coherence ID"], [
        [n, mean_std(x["OOD"] for x in r.values()), spread(x["OOD"] for x in r.values()),
         *(mean_std(x.get(k, 0.0) for x in r.values()) for k in claims)]
        for n, r in methods.items()])
    lines += table(["KEPO minus", *(f"{name}: {w}" for name in PAIRED.values()
                                    for w in ("mean ± std", "KEPO better"))],
                   [[o, *(v for k in PAIRED for v in paired(runs, k, o))]
                    for o in BASELINES])
    primary = tests(runs, PRIMARY, BASELINES)
    adjusted = holm([p for *_, p in primary])
    lines += table([f"primary, {PRIMARY}: KEPO minus", "mean", "95% t interval",
                    "sign-flip p", "Holm p", "verdict"],
                   [[o, f"{m:+.3f}", ci, f"{p:.4f}", f"{q:.4f}", verdict(m, q)]
                    for (o, m, ci, p), q in zip(primary, adjusted)])
    lines += table(["exploratory: KEPO minus", "measure", "mean", "95% t interval",
                    "sign-flip p (unadjusted)"], [
        [o, name, f"{m:+.3f}", ci, f"{p:.4f}"] for key, name in PAIRED.items()
        for o, m, ci, p in tests(runs, key, BASELINES + ABLATIONS) if key != PRIMARY
        or o in ABLATIONS])
    lines += table(["run", "gate fraction", "all-wrong groups / step", "groups hinted / step",
                    "injected / step", "cliff prompts solved"], [
        [n, *(mean_std(x[k] for x in r.values()) for k in (
            "gate_frac", "cliff_groups", "hint_groups", "hint_injected", "cliff_solved"))]
        for n, r in runs.items()])
    Path(out, f"{preset}-report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    figure(curves, Path(out, f"{preset}-curves.png"))

def figure(curves, path, window=10):
    """One panel per PANELS key: each run's mean over seeds against the RL step, the
    per-step metrics smoothed over `window` steps (the OOD curve is not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, (key, title) in zip(axes.flat, PANELS.items()):
        for run, by_seed in curves.items():
            if run.count("-") > 1:
                continue  # the ablations stay in the tables
            steps = sorted({m["step"] for ms in by_seed.values() for m in ms if key in m})
            mean = [statistics.mean(m[key] for ms in by_seed.values() for m in ms
                                    if m["step"] == t and key in m) for t in steps]
            if key != "eval/OOD":
                mean = [statistics.mean(mean[max(0, i - window + 1):i + 1])
                        for i in range(len(mean))]
            ax.plot(steps, mean, label=run[3:])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", title=(
        f"mean over {len(next(iter(curves.values())))} seeds"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="train_small.py's --out")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    report(args.out, args.preset)
