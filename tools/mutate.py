"""Mutation testing of kepo.py: break it one place at a time, run kepo.py's tests.

    python tools/mutate.py                 # every mutant; a table on stdout
    python tools/mutate.py --only clip     # the mutants whose name contains "clip"

A mutant is kepo.py with one change: a statement of the step's functions
deleted (replaced by `pass`), a keyword argument of a call there dropped, a
KEPOConfig field's refusal switched off or the field ignored (its default read
instead), or one of KEPO's rules broken by hand (RULES). Each runs in a copy of
the repository; it is caught when a test fails. A survivor is a missing test,
or a change that cannot alter behaviour (argue it).
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_FUNCTIONS = ["generate_rollouts", "write_hints", "rejection_sample",
                  "knowledge_enhance", "inject", "kepo_backward", "kepo_step",
                  "policy_loss"]
# kepo.py's own tests: .ci/run's floors selection (one process, no train_small.py run)
TESTS = Path(ROOT, ".ci/run").read_text().split('-k "')[1].split('"')[0].replace("\\\n", "")
RULES = {  # name: (kepo.py text, the rule broken)
    "gate r > tau": ("return rewards >= tau", "return rewards > tau"),
    "clip: lower side off": ("ratio.clamp(1 - clip_eps, 1 + clip_eps)",
                             "ratio.clamp(max=1 + clip_eps)"),
    "clip: upper side off": ("ratio.clamp(1 - clip_eps, 1 + clip_eps)",
                             "ratio.clamp(min=1 - clip_eps)"),
    "cliff: some wrong rollout": ('.amax(1) == 0)', '.amin(1) == 0)'),
    "injection: random slots": ("torch.argsort(group, stable=True)",
                                "torch.randperm(len(group))"),
    "injection: highest reward first": ("torch.argsort(group, stable=True)",
                                        "torch.argsort(group, descending=True)"),
    "hints: all or nothing": ("ok and kept(i) < k)", "ok and kept(i) < k and bool("
                              "correct[row // k * k:row // k * k + k].all()))"),
    "hints: untagged groups sampled": ("if h is not None}", "}"),
    "opd keeps the reward term": (
        "advantages = torch.zeros_like(advantages)", "pass"),
    "jsd over all rows": ("gate.nonzero().flatten().tolist()",
                          "list(range(len(gate)))"),
    "advantages: no eps": ("(r.std(1, keepdim=True) + ADV_EPS)", "r.std(1, keepdim=True)"),
    "log-probs of raw logits": ("(logits.float() / temperature)", "logits.float()"),
    "accuracy: the first <answer>": ("tags[-1]", "tags[0]"),
    "format: repeated tags pass": ('_FREE = rf"(?:(?!{_TAG}).)*"', '_FREE = ".*?"'),
    "hint: a cut-off one kept": ('r"<hint>(.*?)</hint>"', 'r"<hint>(.*?)(?:</hint>|$)"'),
}


def step_nodes(tree, kind):
    """Nodes of `kind` inside the functions STEP_FUNCTIONS: (function, node)."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in STEP_FUNCTIONS:
            for node in ast.walk(fn):
                if isinstance(node, kind) and node is not fn:
                    yield fn.name, node


PLACE = ("lineno", "col_offset", "end_lineno", "end_col_offset")


def changed(source, node, change):
    """kepo.py with `change` applied to its copy of `node` (found by place)."""
    tree = ast.parse(source)
    for parent in ast.walk(tree):
        for field_name, value in ast.iter_fields(parent):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if type(item) is type(node) and all(
                        getattr(item, a, None) == getattr(node, a) for a in PLACE):
                    change(parent, field_name, i, item)
                    return ast.unparse(tree)
    raise ValueError(f"no node at line {node.lineno}")


def deletions(source):
    """Each statement of the step's functions replaced by `pass`."""
    def delete(parent, field_name, i, item):
        getattr(parent, field_name)[i] = ast.Pass()
    for fn, stmt in step_nodes(ast.parse(source), ast.stmt):
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        label = " ".join(ast.unparse(stmt).split())[:50]
        yield f"{fn}:{stmt.lineno} delete `{label}`", changed(source, stmt, delete)


def dropped_keywords(source):
    """Each keyword argument of a call in the step's functions dropped."""
    for fn, call in step_nodes(ast.parse(source), ast.Call):
        for k, kw in enumerate(call.keywords):
            if kw.arg is None:
                continue
            def drop(parent, field_name, i, item, k=k):
                del item.keywords[k]
            yield (f"{fn}:{call.lineno} drop {kw.arg}= of {ast.unparse(call.func)[:25]}",
                   changed(source, call, drop))


def config_mutants(source):
    """Per KEPOConfig field: its refusal off (its rule always holds), and
    the field ignored (every cfg.<field> read as its default)."""
    sys.path.insert(0, str(ROOT))
    import kepo
    post = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.FunctionDef) and n.name == "__post_init__")
    rules = next(n for n in ast.walk(post) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", "") == "dict")
    for k, kw in enumerate(rules.keywords):
        def always(parent, field_name, i, item, k=k):
            item.keywords[k].value = ast.Constant(True)
        yield f"KEPOConfig.{kw.arg}: refusal off", changed(source, rules, always)
    for f in fields(kepo.KEPOConfig):
        ignored = re.sub(rf"\bcfg\.{f.name}\b", repr(f.default), source)
        yield f"KEPOConfig.{f.name}: ignored (default {f.default!r})", ignored


def run(name, source, timeout):
    """(caught, the first failing test or why)."""
    with tempfile.TemporaryDirectory() as tmp:
        for file in ("train_small.py", "test_kepo.py"):
            shutil.copy(ROOT / file, tmp)
        shutil.copytree(ROOT / "tools", Path(tmp, "tools"))  # train_small.py imports one
        Path(tmp, "kepo.py").write_text(source)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 "test_kepo.py", "-k", TESTS], cwd=tmp, capture_output=True, text=True,
                timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return True, "timeout"
    failed = re.search(r"FAILED test_kepo.py::(\S+)", proc.stdout)
    if proc.returncode == 0:
        return False, ""
    return True, failed[1] if failed else f"exit {proc.returncode}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="mutants whose name has this text")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a mutant")
    args = parser.parse_args()
    source = (ROOT / "kepo.py").read_text()
    mutants = dict(deletions(source))
    mutants |= dict(dropped_keywords(source))
    mutants |= dict(config_mutants(source))
    for name, (old, new) in RULES.items():
        if source.count(old) != 1:
            sys.exit(f"mutate.py: error: rule {name!r}: {old!r} is not in kepo.py once")
        mutants[f"rule: {name}"] = source.replace(old, new)
    todo = {n: s for n, s in mutants.items() if args.only in n}
    if run("none", source, args.timeout)[0]:
        sys.exit("mutate.py: error: kepo.py's tests fail before any mutation")
    caught = 0
    print("| mutant | caught by |\n|---|---|")
    for name, mutant in todo.items():
        hit, by = run(name, mutant, args.timeout)
        caught += hit
        print(f"| {name.replace('|', '&#124;')} | {by or '**survives**'} |", flush=True)
    print(f"\n{caught} of {len(todo)} mutants caught")


if __name__ == "__main__":
    main()
