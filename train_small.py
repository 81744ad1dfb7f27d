"""KEPO end to end on a toy medical VQA, in one process on a CPU or one GPU.

    python train_small.py                  # KEPO, default preset (one GPU)
    python train_small.py --preset smoke   # every stage on a CPU in seconds
    python train_small.py --compare        # grpo, opd, kdpo, kepo, one student
    python train_small.py --data omni.jsonl --student ckpt/s --teacher ckpt/t

Stages, cached under --out: 1 a teacher that knows every modality and writes
hints; 2 a base student that describes images (a pretrained VLM's stand-in);
3 its warm-up on questions, with a position bias that makes the learning
cliff; the premises; 4 RL with kepo.kepo_step; 5 greedy evaluation.
Simplified: tiny LLaVAs built from configs, a word-level tokenizer, 48x48
images drawn with pillow, options as `ct a , mri b`. One process: for several
GPUs, call kepo.kepo_step from a DDP or FSDP2 trainer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

# ---- Config: one dataclass; a preset overrides defaults, flags both ----
def arg(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class Args:
    preset: str = arg("default", "default (GPU) | cpu | smoke (CI)")
    method: str = arg("kepo", "grpo | opd | kdpo | kepo")
    compare: bool = arg(False, "all four methods, one warm student")
    seed: int = arg(1, "fixes data, init and sampling")
    device: str = arg("auto", "auto | cpu | cuda[:N]")
    out: str = arg("runs", "cache and output")
    resume: bool = arg(False, "continue an interrupted run")
    group_size: int = arg(8, "G, completions a prompt")
    tau: float = arg(1.0, "quality gate: r >= tau")
    hint_mode: str = arg("adaptive", "adaptive (cliff groups) | always")
    max_new_tokens: int = arg(12, "completion and hint cap")
    micro_batch: int = arg(0, "rows a forward+backward (0: all)")
    dtype: str = arg("fp32", "fp32 | bf16 (teacher, reference)")
    steps: int = arg(200, "RL steps (0: stages and premises)")
    batch_prompts: int = arg(64, "B, prompts a step")
    lr: float = arg(3e-4, "RL learning rate")
    train_modality: str = arg("mri", "RL's modality")
    eval_every: int = arg(25, "steps between OOD points and checkpoints")
    data: str = arg("", "OmniMedVQA-style JSONL (needs --student)")
    n_train: int = arg(600, "RL training questions")
    n_test: int = arg(200, "held-out questions a modality")
    n_cliff: int = arg(192, "train prompts to measure the cliff on")
    student: str = arg("", "local VLM checkpoint to train")
    teacher: str = arg("", "local VLM checkpoint, the teacher")
    teacher_width: int = arg(128, "toy teacher: hidden size")
    teacher_layers: int = arg(2, "toy teacher: layers")
    teacher_steps: int = arg(7000, "teacher SFT steps")
    teacher_lr: float = arg(1e-3, "teacher SFT lr")
    n_pool: int = arg(1500, "images per modality, teacher and base")
    student_width: int = arg(48, "toy student: hidden size")
    student_layers: int = arg(2, "toy student: layers")
    sft_lr: float = arg(1e-3, "base and warm-up lr")
    sft_batch: int = arg(64, "supervised stages' batch")
    base_steps: int = arg(1000, "base student steps")
    warm_steps: int = arg(2400, "student warm-up steps")
    n_warm: int = arg(1000, "warm-up questions")

PRESETS = {"default": {},
           "cpu": dict(batch_prompts=16),
           # tiny, high lrs: each RL step has reward spread, gated rows, a gradient
           "smoke": dict(
               teacher_steps=40, base_steps=10, warm_steps=40, steps=6, teacher_lr=1e-2,
               sft_lr=1e-2, sft_batch=16, batch_prompts=4, n_pool=8, n_train=16, n_warm=16,
               n_test=4, n_cliff=8, eval_every=2, student_width=32, student_layers=1,
               teacher_width=48, teacher_layers=1)}
METHODS = ["grpo", "opd", "kdpo", "kepo"]
CHOICES = {"preset": list(PRESETS), "method": METHODS, "dtype": ["fp32", "bf16"],
           "hint_mode": ["adaptive", "always"]}

def parse_args(argv=None):
    """Args from the preset and flags, checked before any heavy import."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="--preset cpu and smoke change some defaults")
    parser.error = lambda why: parser.exit(2, f"train_small.py: error: {why} (see --help)\n")
    for f in fields(Args):
        kind = dict(action="store_true") if f.type == "bool" else dict(
            type=type(f.default), choices=CHOICES.get(f.name))
        parser.add_argument(
            "--" + f.name.replace("_", "-"), **kind, default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {f.default})")
    raw = sys.argv[1:] if argv is None else argv
    flags = [x.split("=")[0] for x in raw if x.startswith("--")]
    if twice := [x for x in flags if flags.count(x) > 1]:
        parser.error(f"{twice[0]} given twice")
    given = vars(parser.parse_args(argv))
    a = Args(**PRESETS[given.get("preset", "default")] | given)
    if problem := check_args(a):
        parser.error(problem)
    return a

def check_args(a: Args):
    """The first problem with the flags, in words, or None."""
    ints = [f.name for f in fields(Args) if f.type == "int" and getattr(a, f.name) < 1
            and f.name not in ("seed", "steps", "micro_batch")]
    lrs = [k for k in ("lr", "teacher_lr", "sft_lr") if not 0 < getattr(a, k) < math.inf]
    flag = lambda names: "--" + names[0].replace("_", "-") if names else ""  # noqa
    checks = [
        (not ints, f"{flag(ints)} must be >= 1"),
        (not lrs, f"{flag(lrs)} must be finite and > 0"),
        (a.group_size >= 2, "--group-size must be >= 2"),
        (min(a.steps, a.micro_batch) >= 0, "--steps and --micro-batch must be >= 0"),
        (0 <= a.tau <= 2, "--tau must be in [0, 2]"),
        (0 <= a.seed < 2**63, "--seed must be in [0, 2**63)"),  # torch's seeds
        (a.n_train >= a.batch_prompts, "--n-train must be >= --batch-prompts"),
        (a.n_cliff <= a.n_train, "--n-cliff must be <= --n-train"),
        (bool(a.student) == bool(a.teacher), "--student and --teacher go together"),
        (not a.data or a.student, "--data needs --student and --teacher"),
        (not a.data or os.path.isfile(a.data), f"--data {a.data}: no such file"),
        (a.device in ("auto", "cpu") or a.device.split(":")[0] == "cuda",
         f"--device {a.device}: auto, cpu or cuda[:N]"),
    ] + [(not p or os.path.isfile(f"{p}/config.json"),
          f"--{k} {p}: not a checkpoint folder (no config.json)")
         for k, p in (("student", a.student), ("teacher", a.teacher))]
    return next((why for ok, why in checks if not ok), None) or out_error(a.out)

def out_error(out):
    """Why --out cannot hold the runs, or None (then it exists)."""
    try:  # a file there: "File exists"
        os.makedirs(out, exist_ok=True)
        Path(out, ".write-test").touch()
        Path(out, ".write-test").unlink()
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror})"

if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports: a bad flag answers at once

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # optional backends
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration,
    LlavaProcessor, PreTrainedTokenizerFast, Qwen2Config, SiglipImageProcessor,
    SiglipVisionConfig)

from transformers.utils import logging as hf_logging  # noqa: E402

import kepo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import rollouts  # noqa: E402  (tools/rollouts.py)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

class UserError(ValueError):
    """Bad input or files: one line, no traceback."""

# ---- Stage 4: RL on the train modality, one kepo_step per batch ----
PROGRESS_SECONDS = 10  # a progress line at least this often
LOGS = ("metrics.jsonl", "rollouts.jsonl")  # RL's logs, a line a step or group

Stages = namedtuple("Stages", "proc teacher warm data before key")  # warm: a folder

def rl(a: Args, cfg, s: Stages, folder: Path, settings: dict):
    """RL from the warm student, also the `kl` metric's reference; returns it."""
    ref = load_model(s.warm, a.device, "the warm student", DTYPES[a.dtype]).requires_grad_(False)
    student = load_model(s.warm, a.device, "the warm student")
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    start, ckpt = resume(a, folder / "ckpt.pt", student, opt), folder / "ckpt.pt"
    for log in LOGS:
        keep_until(folder / log, start)
    t0 = shown = time.time()
    for step in range(start + 1, a.steps + 1):
        # a function of (seed, step): a resumed run sees the same
        exs = random.Random(f"{a.seed}-rl-{step}").sample(s.data.train, a.batch_prompts)
        curve = step % a.eval_every == 0 or step == a.steps
        trace = {} if curve or step == 1 else None  # a logged step
        with torch.autocast(torch.device(a.device).type, torch.bfloat16, a.dtype == "bf16"):
            m = kepo.kepo_step(student, opt, s.proc.tokenizer, student_prompts(
                s.proc, exs, a.device), [e.answer for e in exs], cfg, a.method,
                s.teacher, ref, hint_prompts(exs, s.proc, a.device), trace) | {"step": step}
        if curve:
            hits = correctness(student, s.proc, s.data.curve, cfg, a.device)
            m["eval/OOD"] = summarize(s.data.curve, hits, s.data)["OOD"]
        append_line(folder / "metrics.jsonl", json.dumps(m))
        if trace is not None:
            recs = rollouts.records(step, exs, trace, m, s.proc.tokenizer)
            append_line(folder / "rollouts.jsonl", "\n".join(map(json.dumps, recs)))
        if time.time() - shown > PROGRESS_SECONDS or curve:
            shown = progress(f"step {step:4d}/{a.steps} reward {m['reward']:.2f} acc "
                             f"{m['sample_accuracy']:.2f} cliff {m['cliff_groups']:.2f} "
                             f"gate {m['gate_frac']:.2f}", a.steps - step, step - start, t0)
        if curve and (line := rollouts.summary(recs, cfg.num_hinted)):
            print(line)
        if step % a.eval_every == 0:
            rng = [torch.get_rng_state(), torch.cuda.get_rng_state_all()]
            state = {"model": student.state_dict(), "optimizer": opt.state_dict(),
                     "rng": rng, "step": step, "settings": settings}
            write_atomically(ckpt, partial(torch.save, state))
    write_atomically(folder / "student", lambda d: (
        student.save_pretrained(d), s.proc.save_pretrained(d)))
    print(f"  rollouts: {rollouts.write_page(folder)} (and .jsonl)")
    return student

def keep_until(path, step):
    """A JSON-lines log cut to steps <= step."""
    kept = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step)
    write_atomically(path, lambda p: Path(p).write_text(kept))

def progress(line, left, done, start):
    """Prints `line`, the rate, the time left; returns now."""
    rate = done / (time.time() - start)
    print(f"  {line} | {rate:.2f} steps/s ETA {left / rate:.0f}s")
    return time.time()

def resume(a: Args, ckpt: Path, student, opt):
    """The last finished step: the checkpoint's with --resume, RNG too (a
    resumed run samples alike)."""
    torch.manual_seed(a.seed)
    if not (a.resume and ckpt.exists()):
        return 0
    state = load_checkpoint(ckpt)
    student.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][0])
    torch.cuda.set_rng_state_all(state["rng"][1])
    print(f"resumed {ckpt.parent} at step {state['step']}")
    return state["step"]

# ---- Stage 5 and the premises: greedy accuracy, chance, the cliff ----
EVAL_BATCH = 256  # rows a generate call in evaluation
CURVE_SHARE = 0.25  # of each modality's test set: the OOD curve
# The premises, measured before RL: the toy is calibrated on these alone
TEACHER_MIN_QTYPE = 0.90  # teacher accuracy, every question type
TEACHER_MIN_MODALITY = 0.85  # teacher accuracy, every modality
ROOM = 0.15  # warm student: OOD >= chance + ROOM; ID, OOD <= teacher - ROOM
CLIFF_MIN = 0.15  # share of train prompts whose G samples are all wrong
BASE_MIN = 0.85  # the base student names the organ, every modality

@torch.no_grad()
def completions(model, proc, examples, texts, cfg, device, n=1, greedy=True,
                max_new_tokens=None):
    """n completions of each prompt, EVAL_BATCH rows a call."""
    out, size = [], max(EVAL_BATCH // n, 1)
    suppress = kepo.suppressed_ids(proc.tokenizer, model)
    for i in range(0, len(examples), size):
        batch = encode(proc, examples[i:i + size], texts[i:i + size], device)
        out += kepo.generate_rollouts(
            model, proc.tokenizer, batch, n, cfg, suppress, max_new_tokens, greedy).texts
    return out

def correctness(model, proc, examples, cfg, device, n=1, greedy=True):
    """[len(examples) * n] 1.0 where the answer letter is right."""
    texts = [prompt_text(e, chat(proc)) for e in examples]
    out = completions(model, proc, examples, texts, cfg, device, n, greedy)
    return kepo.accuracy_reward(out, [e.answer for e in examples for _ in range(n)])

THINK_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.S)

def coherent(examples, texts):
    """[N] 1.0 where formatted, the think's letter is the answer's and its
    option the evidence's value (`<think> size large c </think> <answer> c`)."""
    def agree(e, text):
        m = THINK_RE.fullmatch(text.strip()) if kepo.format_reward([text])[0] else None
        words = m[1].split() if m else []
        return len(words) >= 2 and words[-1] == m[2].strip() and words[-1] in ABC[
            :len(e.options)] and e.options[ABC.index(words[-1])] == words[-2]
    return torch.tensor([float(agree(e, t)) for e, t in zip(examples, texts)])

def evaluate(model, proc, data: Data, cfg, device):
    """Greedy accuracy on the test set (summarize), the coherent share."""
    prompts = [prompt_text(e, chat(proc)) for e in data.test]
    texts = completions(model, proc, data.test, prompts, cfg, device)
    res = summarize(data.test, kepo.accuracy_reward(texts, [e.answer for e in data.test]), data)
    coherence = summarize(data.test, coherent(data.test, texts), data)
    return res | {"coherence/ID": coherence["ID"], "coherence/OOD": coherence["OOD"]}

def summarize(examples, correct, data: Data):
    """Accuracy per modality and question type, ID, the OOD mean."""
    def mean(keep):
        hits = [c for e, c in zip(examples, correct.tolist()) if keep(e)]
        return sum(hits) / max(len(hits), 1)
    res = {m: mean(lambda e, m=m: e.modality == m) for m in data.modalities}
    res |= {f"q/{q}": mean(lambda e, q=q: e.qtype == q) for q in data.qtypes}
    ood = [m for m in data.modalities if m != data.train_modality]
    return res | {"ID": res[data.train_modality],
                  "OOD": sum(res[m] for m in ood) / max(len(ood), 1)}

def cliff_mask(model, proc, examples, cfg, device):
    """Per prompt: are all G samples (drawn as in RL) wrong?"""
    right = correctness(model, proc, examples, cfg, device, cfg.group_size, False)
    cliff = kepo.cliff_groups(right, right, cfg.group_size, "accuracy")
    return [i in cliff for i in range(len(examples))]

def teacher_premises(t, mins=(TEACHER_MIN_QTYPE, TEACHER_MIN_MODALITY)):
    """(premise, value, min, None): row t's worst question type, modality."""
    q = min([k for k in t if k.startswith("q/")], key=t.get)
    m = min([k for k in t if "/" not in k and k not in ("ID", "OOD")], key=t.get)
    return [(f"teacher accuracy, worst question type ({q[2:]})", t[q], mins[0], None),
            (f"teacher accuracy, worst modality ({m})", t[m], mins[1], None)]

def premises(rows, cliff, described):
    """The toy's premises before RL, with targets (min, max)."""
    t, s, c = rows["teacher"], rows["student (before RL)"], rows["chance"]
    items = teacher_premises(t) + [
        ("warm student OOD accuracy", s["OOD"], c["OOD"] + ROOM, t["OOD"] - ROOM),
        ("warm student ID accuracy", s["ID"], None, t["ID"] - ROOM),
        ("learning cliff: train prompts with all G samples wrong", cliff, CLIFF_MIN, None)]
    if described is not None:
        m = min(described, key=described.get)
        name = f"base student names the organ, worst modality ({m})"
        items.append((name, described[m], BASE_MIN, None))
    return [{"premise": n, "value": v, "min": lo, "max": hi,
             "holds": (lo is None or v >= lo) and (hi is None or v <= hi)}
            for n, v, lo, hi in items]

def premises_table(items, seed):
    target = lambda p: " and ".join(f"{op} {x:.2f}" for op, x in (  # noqa
        (">=", p["min"]), ("<=", p["max"])) if x is not None)
    return md_table(["premise", f"seed {seed}", "target"], [
        [p["premise"], f"{p['value']:.3f}" + " ✗" * (not p["holds"]), target(p)] for p in items])

def before_rl(a: Args, cfg, proc, teacher, student, data: Data, key: dict):
    """Chance, teacher, warm student, the cliff, the base's descriptions,
    the premises; cached under `key`."""
    path = seed_root(a) / "before_rl.json"
    key = as_json(key | {"n_test": a.n_test, "n_cliff": a.n_cliff, "G": a.group_size})
    if path.exists() and (cached := read(path))["key"] == key:
        return cached
    torch.manual_seed(a.seed)
    mask = cliff_mask(student, proc, data.cliff, cfg, a.device)
    guess = torch.tensor([1 / len(e.options) for e in data.test])  # chance
    rows = {"chance": summarize(data.test, guess, data)}
    for name, model in (("teacher", teacher), ("student (before RL)", student)):
        rows[name] = evaluate(model, proc, data, cfg, a.device)
    described, base = None, stage_paths(a).get("base")
    if base:  # per modality, the descriptions naming the organ
        texts = completions(
            load_model(base, a.device, "the base stage"), proc, data.test,
            [DESCRIBE_PROMPT] * len(data.test), cfg, a.device, max_new_tokens=DESCRIBE_TOKENS)
        hits = [float(f"organ {e.case.organ}" in t) for e, t in zip(data.test, texts)]
        res = summarize(data.test, torch.tensor(hits), data)
        described = {m: res[m] for m in data.modalities}
    by_type = summarize(data.cliff, torch.tensor(mask, dtype=torch.float), data)
    cliff = {q: by_type[f"q/{q}"] for q in data.qtypes} | {"all": by_type["ID"]}
    before = {"rows": rows, "cliff": cliff, "cliff_mask": mask, "key": key,
              "base_describes": described, "premises": premises(rows, cliff["all"], described)}
    write_json(path, before)
    return before

def md_table(head, rows):
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    return [f"| {' | '.join(head)} |", "|---" * len(head) + "|"] + [
        f"| {' | '.join(r)} |" for r in cells]

# ---- Stages 1-3: teacher, base student and warm-up, supervised ----
HINT_SHARE = 0.25  # of the teacher's prompts ask for a hint
HINTED_SHARE = 0.3  # of warm-up prompts carry the hint: learn to use one
REPLAY_SHARE = 0.5  # of a warm-up batch replays the describe task
MODALITY_SHARE = 0.2  # of warm-up questions ask an image's modality
BIASED = ("grading", "attribute")  # the warm-up lists their answer first
MAX_GRAD_NORM = 1.0  # clipping in the supervised stages
PRETRAIN_SEED = 0  # teacher and base stand for released checkpoints
# Past --teacher-steps the teacher trains on until a split of its own
# clears its premises with room for a test set's other questions
CHECK_EVERY = 500  # teacher steps between checks
CHECK_CAP = 2  # at most this times --teacher-steps
CHECK_N = 200  # questions a modality (at most --n-pool)
CHECK_MINS = (0.95, 0.90)  # question type, modality: the premises + 0.05

def supervised_stages(a: Args, proc, data: Data, cfg):
    """Stages 1-3: (teacher, warm student). Teacher and base once for every
    seed, the warm-up per seed."""
    paths, tok = stage_paths(a), proc.tokenizer
    t_size, size = (a.teacher_width, a.teacher_layers), (a.student_width, a.student_layers)
    check = {"every": CHECK_EVERY, "cap": CHECK_CAP * a.teacher_steps}
    teacher = sft_stage(
        a, paths["teacher"], proc, partial(build_vlm, tok, *t_size),
        partial(teacher_batch, pool=data.pool), PRETRAIN_SEED,
        stage_config(a, t_size, a.teacher_steps, a.teacher_lr) | {"check": check},
        "stage 1: teacher, every modality, hints too",
        partial(teacher_check, proc=proc, cfg=cfg, a=a, data=data))
    sft_stage(a, paths["base"], proc, partial(build_vlm, tok, *size),
              partial(describe_batch, pool=data.pool), PRETRAIN_SEED,
              stage_config(a, size, a.base_steps, a.sft_lr),
              "stage 2: base student, describing every modality")
    base = read(paths["base"] / "stage.json")  # the warm-up's parent
    def init():  # the base, vision frozen (as LLaVA's tuning)
        model = load_model(paths["base"], "cpu", "the base stage")
        model.model.vision_tower.requires_grad_(False)
        return model
    config = stage_config(a, size, a.warm_steps, a.sft_lr) | {
        "n_warm": a.n_warm, "modality": data.train_modality, "base": base,
        "frozen": "vision_tower", "replay": REPLAY_SHARE, "modality_share": MODALITY_SHARE,
        "hinted": HINTED_SHARE, "biased": BIASED}
    student = sft_stage(a, paths["warm-up"], proc, init, partial(
        warmup_batch, warm_set=data.warm, pool=data.pool), a.seed + 1, config,
        f"stage 3: student warm-up on {data.train_modality} questions")
    return teacher, student

def stage_config(a: Args, size, steps, lr):
    return {"size": list(size), "steps": steps, "batch": a.sft_batch, "lr": lr,
            "pool": a.n_pool, "image": [IMAGE_SIZE, PATCH]}

def sft_stage(a: Args, path: Path, proc, init, draw_batch, seed, config, title,
              check=None):
    """The model in `path` if built with `config`, else init() trained on
    draw_batch(rng, n) and saved (stage.json); with check, on by "every"
    steps of config["check"] until check(model) holds, or to its "cap"."""
    if (path / "stage.json").exists():
        record = read(path / "stage.json")
        if diff := differences(record["config"], as_json(config)):
            raise UserError(f"cached stage {path} was built with other settings "
                            f"({diff}): use another --out or delete it")
        verify(path, record, "stage.json")
        return load_model(path, a.device, "cached stage")
    print(f"{title} ({config['steps']} steps x {config['batch']})")
    torch.manual_seed(seed)
    model, checked, done = init().to(a.device), None, 0
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    batches = partial(draw_batch, random.Random(f"sft-{path.name}-{seed}"), config["batch"])
    plan = config.get("check", {"cap": config["steps"], "every": 1})
    for until in range(config["steps"], plan["cap"] + 1, plan["every"]):
        sft_steps(a, proc, model, opt, batches, range(done + 1, until + 1), path.name)
        done = until
        if check is None or (checked := check(model) | {"steps": done})["holds"]:
            break
    def save(d):  # weights, then the record
        model.save_pretrained(d)
        proc.save_pretrained(d)
        files = checksums(d, ["model.safetensors"])
        write_json(Path(d, "stage.json"), {"config": config, "check": checked, "files": files})
    write_atomically(path, save)
    return model

def sft_steps(a: Args, proc, model, opt, batches, steps, name):
    """AdamW on batches() = (examples, prompts, targets), the targets' loss."""
    start = shown = time.time()
    for step in steps:
        examples, prompts, targets = batches()
        batch = encode(proc, examples, prompts, a.device, targets)
        labels = batch.input_ids.clone()  # the prompt and padding: -100
        for i, ids in enumerate(proc.tokenizer(targets).input_ids):
            labels[i, :labels.shape[1] - len(ids)] = -100
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     **batch.vision, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        if time.time() - shown > PROGRESS_SECONDS or step == steps[-1]:
            line = f"[{name}] step {step}/{steps[-1]} loss {loss.item():.3f}"
            shown = progress(line, steps[-1] - step, step - steps[0] + 1, start)

def teacher_check(model, proc, cfg, a: Args, data: Data):
    """The teacher premises at CHECK_MINS on a split no seed tests on."""
    exs = with_pixels([e for m in MODALITIES for e in make_split(
        PRETRAIN_SEED, "teacher-check", m, min(CHECK_N, a.n_pool))])
    t = summarize(exs, correctness(model, proc, exs, cfg, a.device), data)
    worst = teacher_premises(t, CHECK_MINS)
    res = {n.split(", worst ")[1]: round(v, 3) for n, v, *_ in worst}
    res["holds"] = all(v >= lo for _, v, lo, _ in worst)  # False: train on
    print(f"  the teacher's own held-out check: {json.dumps(res)}")
    return res

def teacher_batch(rng, n, pool):
    """Fresh questions on pool images; HINT_SHARE ask for a hint."""
    exs = [rng.choice(pool) for _ in range(n)]
    exs = [any_question(rng, e) for e in exs]
    hint = [rng.random() < HINT_SHARE for _ in exs]
    return (exs, [hint_request_text(e) if h else prompt_text(e) for e, h in zip(exs, hint)],
            [hint_text(e) if h else answer_text(e) for e, h in zip(exs, hint)])

def describe_batch(rng, n, pool):
    """The base's task: describe an image (no question)."""
    exs = [rng.choice(pool) for _ in range(n)]
    return exs, [DESCRIBE_PROMPT] * n, [describe_text(e.case) for e in exs]

def warmup_batch(rng, n, warm_set, pool):
    """Train-modality questions, some hinted; modality questions on every
    modality (no collapse to the train one); the describe task replayed.
    BIASED types list their answer first, as position-biased data would:
    the warm student answers "a", wrong once options are shuffled (the
    learning cliff), its evidence still right."""
    n_replay = int(n * REPLAY_SHARE)
    n_modality = int((n - n_replay) * MODALITY_SHARE)
    exs = [rng.choice(warm_set) for _ in range(n - n_replay - n_modality)]
    exs += [replace(ask(rng, e.case, "modality", None), pixels=e.pixels)
            for e in [rng.choice(pool) for _ in range(n_modality)]]
    hinted = [rng.random() < HINTED_SHARE for _ in exs]
    exs = [e if h or e.qtype not in BIASED else answer_first(e) for e, h in zip(exs, hinted)]
    prompts = [hinted_text(e, e.evidence) if h else prompt_text(e) for e, h in zip(exs, hinted)]
    replay = describe_batch(rng, n_replay, pool)
    return exs + replay[0], prompts + replay[1], [answer_text(e) for e in exs] + replay[2]

def answer_first(e):
    others = [o for o in e.options if o != e.truth]
    return replace(e, options=(e.truth, *others), answer="a")

def checkpoints(a: Args):
    """--student/--teacher as stages 1-3: (processor, teacher, student)."""
    procs = [loaded(f"{flag} {path}'s processor", AutoProcessor.from_pretrained, path)
             for flag, path in (("--student", a.student), ("--teacher", a.teacher))]
    for proc in procs:
        proc.tokenizer.padding_side = "left"  # whatever it was saved with
    if procs[0].tokenizer.get_vocab() != procs[1].tokenizer.get_vocab():
        raise UserError("--teacher and --student have different vocabularies: "
                        "token-level distillation needs one")
    if user_turn(procs[0], "x").rstrip().endswith("<think>"):
        raise UserError(f"--student {a.student}: its chat template opens <think> (a "
                        "Thinking model), the completion's to write: use an Instruct one")
    teacher = load_model(a.teacher, a.device, "--teacher", DTYPES[a.dtype])
    return procs[0], teacher, load_model(a.student, a.device, "--student")

# ---- Models and prompts: the toy's tokenizer and VLM, built in code ----
# The toy's models learn a bare layout; a chat model (--student) is asked:
STUDENT_ASK = ("Think it through inside <think> </think> tags, then give the letter "
               "of the correct option inside <answer> </answer> tags.")
TEACHER_ASK = ("The correct answer is ({letter}) {truth}. Write a short hint inside "
               "<hint> </hint> tags that would lead a student to it, without stating "
               "the answer.")
HINTED_ASK = ("Hint: {hint}\nThe correct answer is ({letter}). Reason towards it "
              "without mentioning the hint or that you were given the answer.")
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
DESCRIBE_PROMPT = "describe the image"  # the base student's task
DESCRIBE_TOKENS = 16  # the longest: 13 words and EOS
WORD_SPLIT = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])

def chat(proc):
    return bool(getattr(proc, "chat_template", None))  # a model for instructions

def prompt_text(ex, words=False):
    """The question and options (`words`: sentences, for chat models)."""
    if words:
        options = "\n".join(f"({ABC[i]}) {o}" for i, o in enumerate(ex.options))
        return f"{ex.question}\n{options}\n{STUDENT_ASK}"
    options = " , ".join(f"{o} {ABC[i]}" for i, o in enumerate(ex.options))
    return f"{ex.question} options {options}"

def hint_request_text(ex, words=False):
    """The teacher, shown the answer, asked for a hint."""
    if words:
        ask = TEACHER_ASK.format(letter=ex.answer, truth=ex.truth)
        return prompt_text(ex, True).replace(STUDENT_ASK, ask)
    return f"{prompt_text(ex)} answer {ex.truth} {ex.answer} hint"

def hinted_text(ex, hint, words=False):
    """The authors' "v1" hinted prompt: the hint and the answer."""
    if words:
        return f"{prompt_text(ex, True)}\n{HINTED_ASK.format(hint=hint, letter=ex.answer)}"
    return f"{prompt_text(ex)} hint {hint} answer {ex.answer}"

def answer_text(ex):
    return f"<think> {ex.evidence} {ex.answer} </think> <answer> {ex.answer} </answer> <eos>"

def hint_text(ex):
    return f"<hint> {ex.evidence} </hint> <eos>"

def build_processor():
    """A word-level tokenizer of the toy's words, a SigLIP image processor."""
    words = set(LETTERS) | set(MODALITIES + ORGANS + FINDINGS + list(GRADES) + COUNTS)
    words |= {",", "left", "right", "options", "answer", "hint", "modality", "organ",
              "finding", "size", "count", "side", *DESCRIBE_PROMPT.split()}
    for q in [*filter(None, QUESTIONS.values()), *ATTRIBUTE_QUESTIONS.values()]:
        words |= set(q.split())
    images = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                  image_mean=[PIXEL_MEAN] * 3, image_std=[PIXEL_STD] * 3)
    return LlavaProcessor(
        images, word_tokenizer(sorted(words)), patch_size=PATCH, image_token="<image>",
        vision_feature_select_strategy="full", num_additional_image_tokens=0)

def word_tokenizer(words):
    """Lower-cased words split on spaces and punctuation, left padding,
    pad/bos/eos/unk, <image> and KEPO's tags whole."""
    vocab = dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", "<image>", *words])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), WORD_SPLIT
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left",
        extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens(TAGS)
    return tok

def build_vlm(tok, hidden, layers):
    """A LLaVA, random init: SigLIP vision (IMAGE_TOKENS patches), Qwen2 text."""
    size = dict(hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4)
    vision = SiglipVisionConfig(**size, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = Qwen2Config(
        **size, vocab_size=len(tok), num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=IMAGE_TOKENS,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full"))

def user_turn(proc, text):
    """The image and `text` in the chat template, or `<image> text`."""
    if not chat(proc):
        return f"{proc.image_token} {text}"
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return proc.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)

def encode(proc, examples, texts, device, targets=()):
    """Prompts (and SFT targets) with their images, left-padded. Toy pixels
    skip the processor, normalised as it would (a test checks)."""
    full = [user_turn(proc, t) + (f" {targets[i]}" if targets else "")
            for i, t in enumerate(texts)]
    if all(e.pixels is not None for e in examples):
        image, pixels = proc.image_token, torch.stack([e.pixels for e in examples]).float()
        full = [t.replace(image, image * IMAGE_TOKENS) for t in full]
        enc = proc.tokenizer(full, padding=True, return_tensors="pt")
        enc = dict(enc) | {"pixel_values": (pixels * (1 / 255) - PIXEL_MEAN) / PIXEL_STD}
    else:  # a list of images per prompt: the form every processor reads
        images = [[Image.open(e.image).convert("RGB") if e.image else draw(e.case)]
                  for e in examples]
        enc = proc(text=full, images=images, return_tensors="pt", padding=True)
    # the forward's prompt inputs (not a processor's labels)
    vision = {k: v.to(device) for k, v in enc.items()
              if k not in ("input_ids", "attention_mask", "labels")}
    return kepo.PromptBatch(
        enc["input_ids"].to(device), enc["attention_mask"].to(device), vision)

def student_prompts(proc, exs, device):
    """A step's hint-free prompts, worded for the model."""
    return encode(proc, exs, [prompt_text(e, chat(proc)) for e in exs], device)

def hint_prompts(exs, proc, device):
    """A step's hint prompt builders; groups index `exs`."""
    def prompts(groups, texts):
        return encode(proc, [exs[g] for g in groups], texts, device)
    words = chat(proc)
    return kepo.HintPrompts(
        lambda gs: prompts(gs, [hint_request_text(exs[g], words) for g in gs]),
        lambda gs, hints: prompts(
            gs, [hinted_text(exs[g], h, words) for g, h in zip(gs, hints)]))

# ---- Toy medical VQA: cases, images, questions, the splits of a run ----
MODALITIES = ["ct", "dermoscopy", "fundus", "mri", "microscopy", "oct", "ultrasound", "xray"]
ORGAN_SHAPES = {"brain": [("ellipse", (7, 6, 41, 42))],  # ImageDraw calls
                "lung": [("ellipse", (5, 6, 23, 43)), ("ellipse", (25, 6, 43, 43))],
                "liver": [("polygon", [(4, 7), (44, 7), (37, 42), (11, 42)])],
                "heart": [("polygon", [(24, 3), (45, 24), (24, 45), (3, 24)])]}
ORGANS, FINDINGS = list(ORGAN_SHAPES), ["normal", "tumor", "cyst", "bleed"]
GRADES = {"small": 3, "medium": 5, "large": 7}  # lesion radius in pixels
CYST_WALL, BLUR_RADIUS = 2, 0.6  # pixels: a cyst is a ring, a tumor a disc
NOISE = {"fan": 40 / 255, "other": 14 / 255}  # noise blended in (ultrasound: grain)
COUNTS, SLOTS = ["one", "two", "three"], [(16, 17), (32, 17), (16, 31), (32, 31)]
QUESTIONS = {"modality": "what imaging modality is this ?", "anatomy": "which organ is shown ?",
             "diagnosis": "what is the finding ?", "grading": "what is the lesion size ?",
             "attribute": None}  # side or count:
ATTRIBUTE_QUESTIONS = {"side": "on which side is the lesion ?",
                       "count": "how many lesions are there ?"}
LETTERS, ABC = "abcd", string.ascii_lowercase  # the toy's option letters, a file's
IMAGE_SIZE, PATCH = 48, 12  # 16 image tokens of 12x12: a 3-pixel lesion shows
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # the image processor's normalisation
STYLES = {  # background, organ and lesion colours, field of view
    "ct": ((0, 0, 0), (150, 150, 150), (60, 60, 60), "circle"),
    "dermoscopy": ((205, 155, 125), (150, 95, 65), (60, 35, 25), "vignette"),
    "fundus": ((0, 0, 0), (200, 90, 40), (250, 220, 120), "disc"),
    "mri": ((10, 10, 10), (100, 100, 100), (235, 235, 235), "full"),
    "microscopy": ((235, 185, 225), (165, 95, 175), (70, 30, 110), "dots"),
    "oct": ((30, 40, 70), (110, 135, 175), (5, 5, 15), "bands"),
    "ultrasound": ((0, 0, 0), (95, 95, 95), (20, 20, 20), "fan"),
    "xray": ((25, 25, 25), (205, 205, 205), (110, 110, 110), "ribs")}

@dataclass(frozen=True)
class Case:
    """What a synthetic image shows; `seed` fixes its texture."""
    modality: str
    organ: str
    finding: str
    grade: str | None  # None for normal
    slots: tuple  # lesion centres
    seed: int

@dataclass(frozen=True)
class Example:
    """A multiple-choice question on a toy case or an image file."""
    case: Case | None
    qtype: str
    question: str
    options: tuple
    answer: str  # a lower-case letter
    evidence: str  # "size large": what <think> and a hint state
    modality: str
    image: str = ""  # an image file (JSONL data)
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def truth(self):
        return self.options[ABC.index(self.answer)]

def draw_field(d, style, bg, rng, s=IMAGE_SIZE):
    """The modality's field of view and texture."""
    if style == "circle":
        d.ellipse((2, 2, s - 3, s - 3), fill=(45, 45, 45))
    elif style == "disc":
        d.ellipse((3, 3, s - 4, s - 4), fill=(150, 50, 20))
        for _ in range(3):
            d.line((s // 2, s // 2, rng.randrange(s), rng.randrange(s)), fill=(120, 20, 10))
    elif style == "fan":
        d.pieslice((-s // 2, -s // 3, s + s // 2, s + s // 2), 55, 125, fill=(55, 55, 55))
    elif style == "vignette":
        d.ellipse((-6, -6, s + 5, s + 5), outline=(90, 60, 40), width=6)
    elif style == "dots":
        d.point([(rng.randrange(s), rng.randrange(s)) for _ in range(40)], fill=(120, 60, 140))
    elif style == "bands":
        for y in range(4, s, 8):
            d.rectangle((0, y, s, y + 2), fill=tuple(c + 35 for c in bg))
    elif style == "ribs":
        for y in range(6, s, 9):
            d.arc((4, y - 6, s - 5, y + 10), 200, 340, fill=(150, 150, 150), width=2)

def draw(case):
    """The case as a 48x48 RGB image: field, organ, lesions, blur, noise."""
    rng, (bg, organ, lesion, style) = random.Random(case.seed), STYLES[case.modality]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    draw_field(d, style, bg, rng)
    for shape, xy in ORGAN_SHAPES[case.organ]:
        getattr(d, shape)(xy, fill=organ)
    for x, y in case.slots:
        r = GRADES[case.grade]
        if case.finding == "tumor":
            d.ellipse((x - r, y - r, x + r, y + r), fill=lesion)
        elif case.finding == "cyst":
            d.ellipse((x - r, y - r, x + r, y + r), outline=lesion, width=CYST_WALL)
        else:  # bleed
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=lesion)
    img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    noise = Image.frombytes("L", img.size, rng.randbytes(IMAGE_SIZE * IMAGE_SIZE))
    return Image.blend(img, noise.convert("RGB"), NOISE.get(style, NOISE["other"]))

def side(case):
    return "left" if case.slots[0][0] < IMAGE_SIZE // 2 else "right"

def ask(rng, case, qtype, attribute):
    """A multiple-choice question of `qtype` about `case`, options shuffled."""
    n, others = len(case.slots), [m for m in MODALITIES if m != case.modality]
    truth, choices, key = {
        "modality": (case.modality, rng.sample(others, 3) + [case.modality], "modality"),
        "anatomy": (case.organ, list(ORGANS), "organ"),
        "diagnosis": (case.finding, list(FINDINGS), "finding"),
        "grading": (case.grade, list(GRADES), "size"),
        "attribute": (side(case), ["left", "right"], "side") if attribute == "side"
        else (COUNTS[n - 1] if n else None, list(COUNTS), "count")}[qtype]
    rng.shuffle(choices)
    return Example(case, qtype, QUESTIONS[qtype] or ATTRIBUTE_QUESTIONS[attribute],
                   tuple(choices), LETTERS[choices.index(truth)], f"{key} {truth}",
                   case.modality)

def any_question(rng, ex):
    """A fresh question that ex's case can answer, on ex's image."""
    n = len(ex.case.slots)
    qtype = rng.choice(list(QUESTIONS) if n else ["modality", "anatomy", "diagnosis"])
    kinds = ["side", "count"] if n == 1 else ["count"]
    attribute = rng.choice(kinds) if qtype == "attribute" else None
    return replace(ask(rng, ex.case, qtype, attribute), pixels=ex.pixels)

def describe_text(case):
    """The base student's target: the image in words."""
    words = [f"modality {case.modality}", f"organ {case.organ}", f"finding {case.finding}"]
    if case.slots:
        words += [f"size {case.grade}", f"count {COUNTS[len(case.slots) - 1]}"]
    if len(case.slots) == 1:
        words.append(f"side {side(case)}")
    return " ".join(words) + " <eos>"

def make_split(seed, name, modality, n):
    """A split fixed by (seed, name, modality): questions of random types,
    each about a new case that can answer it."""
    rng, split = random.Random(f"{seed}-{name}-{modality}"), []
    for _ in range(n):
        qtype = rng.choice(list(QUESTIONS))
        attribute = rng.choice(list(ATTRIBUTE_QUESTIONS)) if qtype == "attribute" else None
        finding = rng.choice(FINDINGS[1:] if qtype in ("grading", "attribute") else FINDINGS)
        k = 0 if finding == "normal" else 1 if attribute == "side" else rng.randint(1, 3)
        case = Case(modality, rng.choice(ORGANS), finding, rng.choice(list(GRADES)) if k
                    else None, tuple(rng.sample(SLOTS, k)), rng.randrange(2**31))
        split.append(ask(rng, case, qtype, attribute))
    return split

def with_pixels(examples):
    """The examples with images drawn: uint8 [3, H, W]."""
    def pixels(e):
        raw = torch.frombuffer(bytearray(draw(e.case).tobytes()), dtype=torch.uint8)
        return raw.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1)
    return [replace(e, pixels=pixels(e)) for e in examples]

@dataclass
class Data:
    """A run's questions: fixed splits of the toy or a JSONL file."""
    modalities: list
    qtypes: list
    train_modality: str
    train: list  # RL prompts
    warm: list  # the warm-up set
    test: list  # held out, every modality
    curve: list  # the OOD curve's subset of test
    cliff: list  # train prompts to measure the cliff on
    pool: list  # teacher's and base's images, every modality
    fingerprint: str  # names the data in records

def curve(test, n_test):
    """The OOD curve's questions: each modality's first CURVE_SHARE."""
    k = max(1, int(n_test * CURVE_SHARE))
    return [e for m in dict.fromkeys(e.modality for e in test)
            for e in [f for f in test if f.modality == m][:k]]

def toy_data(a: Args):
    """The toy's splits for a.seed (the pool: seed 0), pixels drawn for the
    toy's models."""
    if a.train_modality not in MODALITIES:
        raise UserError(f"--train-modality must be one of {MODALITIES}")
    def split(name, modalities, n, seed=a.seed):
        exs = [e for m in modalities for e in make_split(seed, name, m, n)]
        return exs if a.student else with_pixels(exs)
    train, test = split("train", [a.train_modality], a.n_train), split("test", MODALITIES, a.n_test)
    pool = [] if a.student else split("pool", MODALITIES, a.n_pool, PRETRAIN_SEED)
    return Data(MODALITIES, list(QUESTIONS), a.train_modality, train,
                split("warm", [a.train_modality], a.n_warm), test, curve(test, a.n_test),
                train[:a.n_cliff], pool, "toy")

# ---- Your own data (--data): OmniMedVQA-style JSONL, checked first ----
HOLDOUT_SHARE = 0.2  # at most this share of a modality is held out
QUOTE = 200  # characters of a value an error quotes
FIELDS = {"image": str, "question": str, "options": list, "answer": str, "modality": str,
          "qtype": str}

def parse_record(line, folder):
    """One JSONL line -> Example; a ValueError says what's wrong."""
    rec = json.loads(line)
    if bad := [k for k, t in FIELDS.items()
               if not (isinstance(rec, dict) and isinstance(rec.get(k), t) and rec[k])]:
        raise ValueError(f"missing, empty or mistyped fields {bad}")
    options, answer = rec["options"], rec["answer"].strip().lower()
    if not 2 <= len(options) <= 26 or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"options must be 2-26 strings, got {repr(options)[:QUOTE]}")
    if len(set(options)) < len(options):
        raise ValueError(f"options repeat: {repr(options)[:QUOTE]}")
    if answer not in ABC[:len(options)]:
        raise ValueError(f"answer {repr(rec['answer'])[:QUOTE]} is not a letter of the options")
    return Example(None, rec["qtype"], rec["question"], tuple(options), answer,
                   options[ABC.index(answer)], rec["modality"], f"{folder}/{rec['image']}")

def jsonl_data(a: Args):
    """Every record and image checked first (file:line and why). A shuffle
    keyed by the file holds out min(n_test, 20%) a modality, every seed."""
    folder, examples = os.path.dirname(os.path.abspath(a.data)), []
    for number, raw in enumerate(Path(a.data).read_bytes().splitlines(), 1):
        try:
            if raw.decode("utf-8").strip():
                examples.append(parse_record(raw.decode("utf-8"), folder))
                with Image.open(examples[-1].image) as im:
                    im.load()  # a cut image fails here, not in training
        except (ValueError, OSError) as e:  # UnicodeDecodeError too
            raise UserError(f"{a.data}:{number}: {str(e)[:QUOTE]}") from None
    fingerprint = sha(a.data)[:12]
    test, pool = {}, {}
    for m in sorted({e.modality for e in examples}):
        exs = [e for e in examples if e.modality == m]
        exs = random.Random(f"{fingerprint}-split-{m}").sample(exs, len(exs))
        n = max(1, min(a.n_test, int(len(exs) * HOLDOUT_SHARE)))
        test[m], pool[m] = exs[:n], exs[n:]
    if len(train := pool.get(a.train_modality, [])) < a.batch_prompts:
        raise UserError(f"{a.data}: {len(train)} {a.train_modality} questions, < --batch-prompts")
    return Data(list(test), sorted({e.qtype for e in examples}), a.train_modality, train,
                [], sum(test.values(), []), curve(sum(test.values(), []), a.n_test),
                train[:a.n_cliff], [], fingerprint)

# ---- Files: folders, atomic writes, checkpoints, reruns ----
def tag(a: Args):
    """Names a run's folders: preset, data file, student."""
    return "-".join([a.preset] + [Path(x.rstrip("/")).stem for x in (a.data, a.student) if x])

def seed_root(a: Args):
    return Path(a.out, f"{tag(a)}-seed{a.seed}")

def stage_paths(a: Args):
    """The supervised stages' folders; seeds share teacher and base."""
    if a.student:
        return {}
    return {"teacher": Path(a.out, f"{tag(a)}-teacher"), "base": Path(a.out, f"{tag(a)}-base"),
            "warm-up": seed_root(a) / "student_init"}

def run_name(a: Args):
    """rl-{method}, plus its flags off their default (rl-kepo-tau2)."""
    tau = a.method in ("kdpo", "kepo") and a.tau != Args.tau
    always = a.method == "kepo" and a.hint_mode != Args.hint_mode
    return f"rl-{a.method}" + f"-tau{a.tau:g}" * tau + f"-{a.hint_mode}" * always

def as_json(obj):
    return json.loads(json.dumps(obj))  # as it reads back: tuples are lists

def read(path, load=lambda p: json.loads(Path(p).read_text())):
    """A file as load(path) reads it (JSON); a damaged one is named."""
    try:
        return load(path)
    except Exception as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}): delete it") from None

def sha(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def checksums(folder, names):
    """{path: sha256} of the files `names` (files or folders) in `folder`."""
    paths = [Path(folder, n) for n in names]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f.relative_to(folder).as_posix(): sha(f) for f in files if f.is_file()}

def verify(folder, record, name):
    """Each file `record` lists is as written, or one line names it."""
    for file, digest in record["files"].items():
        if not Path(folder, file).is_file() or sha(Path(folder, file)) != digest:
            raise UserError(f"{folder}/{file} is damaged or missing (not as {name} "
                            f"recorded): delete {folder} to rebuild it")

def write_json(path, obj):
    write_atomically(path, lambda p: Path(p).write_text(json.dumps(obj)))

def write_atomically(path, write):
    """write(tmp), renamed to `path` once whole: a kill or a full disk
    leaves the previous `path` as it was."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    try:
        write(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except Exception as e:  # a full disk: OSError, torch's RuntimeError, ...
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        full = shutil.disk_usage(path.parent).free < 2**20
        if not (full or isinstance(e, OSError)):
            raise  # a bug
        raise UserError(f"cannot write {path}: " + (
            "the disk is full" if full else str(e).split("\n")[0])) from None

def append_line(path, line):
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None

def read_jsonl(path):
    lines = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]  # noqa
    return read(path, lines) if Path(path).exists() else []

def loaded(what, load, *args, **kwargs):
    """load(...), or one line: `what` cannot be loaded, and why."""
    try:
        return load(*args, **kwargs)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:QUOTE]}"
        raise UserError(f"{what} cannot be loaded ({why})") from e

def load_model(path, device, what, dtype=torch.float32):
    """from_pretrained in `dtype` (fp32 unless asked: in a checkpoint's
    bf16, which transformers 5 keeps, a small lr moves no weight)."""
    load = AutoModelForImageTextToText.from_pretrained
    return loaded(f"{what} {path}", load, path, dtype=dtype).to(device)

def load_checkpoint(path):
    return read(path, partial(torch.load, map_location="cpu", weights_only=True))

def run_settings(a: Args, cfg, key):
    """All that shapes an RL run, stages included: reruns match it."""
    unused = ("hint_mode",) * (a.method != "kepo") + ("tau",) * (a.method in ("grpo", "opd"))
    skip = unused + ("out", "resume", "compare", "device")
    return as_json({k: v for k, v in asdict(a).items() if k not in skip} | {
        "kepo": {k: v for k, v in asdict(cfg).items() if k not in unused}, "stages": key})

def differences(then, now, at=""):
    """Where two settings differ, leaf by leaf: "lr 0.1 then, 0.2 now"."""
    if isinstance(then, dict) and isinstance(now, dict):
        parts = [differences(then.get(k), now.get(k), f"{at}{k}.") for k in sorted(then | now)]
        return ", ".join(filter(None, parts))
    return f"{at[:-1]} {then!r} then, {now!r} now"[:200] if then != now else ""

def finished_or_resumable(a: Args, folder, settings):
    """A finished run's results (files checked), or None to train; refuses
    to mix settings or overwrite an unfinished run."""
    if (folder / "results.json").exists():
        done = read(folder / "results.json")
        if diff := differences(done["settings"], settings):
            raise UserError(f"{folder} finished with other settings ({diff}): another --out?")
        verify(folder, done, "results.json")
        return done
    if (folder / "ckpt.pt").exists():
        saved = load_checkpoint(folder / "ckpt.pt")
        if not a.resume:
            raise UserError(f"{folder} holds an unfinished run (step {saved['step']}): "
                            "add --resume, or delete it")
        if diff := differences(saved["settings"], settings):
            raise UserError(f"--resume: {folder} was made with other settings ({diff})")
    elif a.resume:
        print(f"--resume: nothing to resume in {folder}: it starts anew")

# ---- One seed: the stages, then RL and evaluation per method ----
def main(a: Args):
    """Stages 1-3, the premises, then 4-5 per method."""
    start = time.time()
    cfg = kepo.KEPOConfig(
        group_size=a.group_size, tau=a.tau, hint_mode=a.hint_mode, max_new_tokens=a.max_new_tokens,
        max_hint_tokens=a.max_new_tokens, micro_batch_size=a.micro_batch or None)
    where = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") \
        else f"cpu ({torch.get_num_threads()} threads)"
    todo = [n for n, p in stage_paths(a).items() if not (p / "stage.json").exists()]
    print(f"train_small.py: {'compare' if a.compare else a.method}, preset {a.preset}, "
          f"seed {a.seed}, {where} | stages to train: {', '.join(todo) or 'none'}")
    s = stages(a, cfg)
    rows = dict(s.before["rows"])
    for r in ([replace(a, method=m) for m in METHODS] if a.compare else [a]) * (a.steps > 0):
        rows[run_name(r)] = run_method(r, cfg, s)
    print(f"\ngreedy accuracy on {len(s.data.test)} held-out questions (* in "
          "distribution; chance from the options):")
    cols = s.data.modalities + ["ID", "OOD"] + [f"q/{q}" for q in s.data.qtypes]
    head = [c + "*" if c == a.train_modality else c.removeprefix("q/") for c in cols]
    print("\n".join(md_table([""] + head, [[n] + [r[c] for c in cols] for n, r in rows.items()])))
    print(f"\nresults in {seed_root(a)}/ ({time.time() - start:.0f}s)")

def stages(a: Args, cfg):
    """Stages 1-3 (trained, cached or checkpoints), the premises."""
    data = jsonl_data(a) if a.data else toy_data(a)
    seed_root(a).mkdir(parents=True, exist_ok=True)
    if a.student:
        proc, teacher, student = checkpoints(a)
    else:
        proc = build_processor()
        teacher, student = supervised_stages(a, proc, data, cfg)
    key = built_from(a, data)
    before = before_rl(a, cfg, proc, teacher, student, data, key)
    small = "; the smoke preset is too small for them" * (a.preset == "smoke")
    print(f"premises (before RL; methods compare where they hold, ✗ where not{small}):")
    print("\n".join(premises_table(before["premises"], a.seed)))
    teacher = teacher.to(DTYPES[a.dtype]).requires_grad_(False)
    warm = a.student or str(stage_paths(a)["warm-up"])
    return Stages(proc, teacher, warm, data, before, key)

def built_from(a: Args, data: Data):
    """What premises and runs are built from: stage records (settings and
    weights), checkpoint files, the data."""
    return {"stages": {n: read(p / "stage.json") for n, p in stage_paths(a).items()},
            "checkpoints": {p: checksums(p, ["."]) for p in (a.student, a.teacher) if p},
            "data": data.fingerprint, "train_modality": a.train_modality}

def run_method(a: Args, cfg, s: Stages):
    """Stages 4-5 for one method: RL, evaluation, results.json."""
    folder, settings = seed_root(a) / run_name(a), run_settings(a, cfg, s.key)
    if done := finished_or_resumable(a, folder, settings):
        print(f"{folder} finished earlier with these settings: its results are reused")
        return done
    folder.mkdir(exist_ok=True)
    print(f"stage 4: RL ({run_name(a)}) on {len(s.data.train)} {a.train_modality} "
          f"questions, {a.steps} steps x {a.batch_prompts} prompts x G={a.group_size}")
    student = rl(a, cfg, s, folder, settings)
    res = evaluate(student, s.proc, s.data, cfg, a.device)
    still, was = cliff_mask(student, s.proc, s.data.cliff, cfg, a.device), s.before["cliff_mask"]
    res["cliff_solved"] = sum(w and not n for w, n in zip(was, still)) / max(sum(was), 1)
    res["files"] = checksums(folder, [*LOGS, "rollouts.html", "student"])
    write_json(folder / "results.json", res | {"run": run_name(a), "settings": settings})
    (folder / "ckpt.pt").unlink(missing_ok=True)  # student/ holds the result
    return res

# ---- Command line: one line for a user error (2) or Ctrl-C (130) ----
def cli(a: Args):
    sys.stdout.reconfigure(line_buffering=True)  # a redirected log fills live
    hf_logging.disable_progress_bar()
    try:
        if a.device == "auto":
            a = replace(a, device="cuda" if torch.cuda.is_available() else "cpu")
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {a.device}: torch sees no CUDA GPU (try --device cpu)")
        main(a)
    except UserError as e:
        print(f"train_small.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {a.out}/ keeps finished stages and RL checkpoints: "
              "rerun (with --resume for RL)", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    cli(ARGS)
