"""The tables and figure of the toy's results, from the runs' files under one --out.

    python tools/report.py runs --preset cpu   # runs/cpu-report.md, runs/cpu-curves.png

Per seed: before_rl.json (chance, teacher, the student before RL, the premises) and each
rl-*/results.json and metrics.jsonl that train_small.py wrote. Over seeds: mean ± sample
std, and KEPO minus each baseline seed by seed (the same warm student and test questions).
The figure needs matplotlib (pip install matplotlib); the tables only the standard library.

The measures of the paper's three claims, fixed before the runs (docs/RESULTS.md):
- out-of-distribution accuracy: greedy, on 200 test questions per modality (OOD, ID);
- training stability: the largest drop of a run's OOD curve (max_drop), and the spread
  (sample std) over seeds of the final OOD accuracy;
- coherent reasoning: the share of greedy completions whose <think> letter is the
  <answer>'s and whose option is the evidence it states (coherence/OOD, coherence/ID).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

RUNS = ["rl-grpo", "rl-opd", "rl-kdpo", "rl-kepo", "rl-kepo-tau0", "rl-kepo-tau2",
        "rl-kepo-always"]
BASELINES = ["rl-grpo", "rl-opd", "rl-kdpo"]
PAIRED = {"OOD": "OOD", "ID": "ID", "max_drop": "largest OOD drop",
          "coherence/OOD": "coherence OOD", "coherence/ID": "coherence ID"}
PANELS = {"reward": "training reward", "cliff_groups": "groups with every sample wrong",
          "gate_frac": "gate fraction", "distill_loss": "distillation loss",
          "eval/OOD": "OOD accuracy (curve subset)"}

def max_drop(values):
    """The largest fall of a curve below its best point so far (0 if it never falls)."""
    best, drop = float("-inf"), 0.0
    for v in values:
        best = max(best, v)
        drop = max(drop, best - v)
    return drop

def spread(values):
    values = list(values)
    return f"{statistics.stdev(values):.3f}" if len(values) > 1 else ""

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
