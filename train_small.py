"""KEPO end to end on a toy medical VQA: data, teacher, student, RL, evaluation, in one process.

    python train_small.py                     # KEPO, default preset (one GPU)
    python train_small.py --preset smoke      # every stage on CPU in about 10 s
    python train_small.py --preset cpu        # the preset of the README's results, for CPU-only machines
    python train_small.py --compare           # grpo, opd, kdpo and kepo from the same student and seed
    python train_small.py --steps 0           # the stages and the premises table only
    python train_small.py --data omni.jsonl --student ckpt/student --teacher ckpt/teacher   # beyond the toy
    torchrun --nproc_per_node 4 train_small.py ...   # one process per GPU (DDP), after a --steps 0 run
    torchrun --nproc_per_node 8 train_small.py --shard ...   # models sharded over the GPUs (FSDP2)

Stages, each cached under --out: 1. teacher SFT on every modality, also writing a hint from the answer; 2. base
student pretrained to describe images of every modality (the stand-in for a pretrained VLM); 3. warm-up SFT on a small
train-modality set, then the premises table; 4. RL on the train modality with kepo.kepo_step; 5. greedy evaluation on
every modality, chance beside it. The file reads: config, the RL loop, evaluation, the supervised stages, models and
prompts, the toy data, JSONL data, infrastructure, one seed's run, the report, the CLI.

Simplified on purpose: tiny LLaVA-style models built from configs (random init, a word-level tokenizer built in code),
48x48 images drawn with pillow in 8 synthetic "modalities" that share anatomy and findings but differ in look, and
multiple-choice questions listed as `options ct a , mri b , ...` (the letter after the option text makes the lookup an
induction copy that a 2-layer model learns). The RL step is kepo.kepo_step, as a real trainer calls it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import statistics
import string
import sys
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path


# ---- Config: one dataclass; a preset overrides some of its defaults, flags override both -------------------------
def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # what to run
    preset: str = arg("default", "default (one GPU) | cpu (16 RL prompts a step, for CPU-only machines) | smoke (CI)")
    method: str = arg("kepo", "grpo | opd | kdpo | kepo")
    compare: bool = arg(False, "run grpo, opd, kdpo and kepo from the same student, one after the other")
    seed: int = arg(1, "fixes data, initialisation and sampling (bit-exact on CPU)")
    device: str = arg("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    # where
    out: str = arg("runs", "cache and output folder")
    resume: bool = arg(False, "continue an interrupted RL run from its last checkpoint, with the same settings")
    report: bool = arg(False, "only aggregate the results under --out over seeds into markdown tables")
    # KEPO (KEPOConfig's other fields keep the authors' defaults)
    group_size: int = arg(8, "G, completions per prompt")
    tau: float = arg(1.0, "quality gate r >= tau, r = accuracy + format in {0, 1, 2}")
    hint_mode: str = arg("adaptive", "adaptive: hints for groups with no correct rollout | always: every group")
    max_new_tokens: int = arg(12, "cap on completion and hint tokens (the toy's longest answer is 9)")
    # memory and GPUs
    micro_batch: int = arg(0, "rows per forward and backward of an RL step, gradients accumulated exactly (0: all)")
    dtype: str = arg("fp32", "fp32 | bf16: bf16 teacher and reference, bf16 autocast for the student (fp32 weights)")
    shard: bool = arg(False, "under torchrun: FSDP2-shard student, reference and teacher (default: DDP)")
    # RL (stage 4), and how often it evaluates, checkpoints and logs
    steps: int = arg(200, "RL steps (0: stop after the stages and the premises table)")
    batch_prompts: int = arg(64, "prompts per RL step (B; split over torchrun processes)")
    lr: float = arg(3e-4, "RL learning rate, the same for every method")
    train_modality: str = arg("mri", "the modality RL trains on; evaluation covers every modality")
    eval_every: int = arg(25, "RL steps between points of the OOD curve")
    ckpt_every: int = arg(25, "RL checkpoint interval in steps")
    log_every: int = arg(10, "RL progress line interval in steps (also printed every 10 s)")
    # questions: the toy's, or a file's
    data: str = arg("", "OmniMedVQA-style JSONL: image, question, options, answer, modality, qtype (default: toy)")
    n_train: int = arg(600, "RL training questions")
    n_test: int = arg(200, "held-out questions per modality")
    n_cliff: int = arg(192, "train prompts on which the learning cliff is measured")
    n_eval_curve: int = arg(24, "held-out questions per modality in the OOD curve")
    # the teacher (stage 1): a checkpoint, or the toy's, trained on n_pool images per modality
    teacher: str = arg("", "local HF VLM checkpoint of the teacher, same tokenizer as --student (pass both)")
    teacher_width: int = arg(128, "toy teacher: hidden size")
    teacher_layers: int = arg(2, "toy teacher: layers")
    teacher_steps: int = arg(4500, "teacher SFT steps")
    teacher_lr: float = arg(1e-3, "teacher SFT learning rate")
    n_pool: int = arg(1500, "teacher and base pretraining images per modality")
    # the student (stages 2-3): a checkpoint, or the toy's, pretrained (base) then warmed up on n_warm questions
    student: str = arg("", "local HF VLM checkpoint (model + processor) to train instead of the toy student")
    student_width: int = arg(48, "toy student: hidden size")
    student_layers: int = arg(2, "toy student: layers of the vision tower and of the text model")
    sft_lr: float = arg(1e-3, "base and warm-up learning rate")
    sft_batch: int = arg(64, "SFT batch size (all three supervised stages)")
    base_steps: int = arg(1000, "base student pretraining steps")
    warm_steps: int = arg(800, "student warm-up SFT steps")
    n_warm: int = arg(1000, "warm-up questions")


PRESETS = {  # overrides of Args defaults; a flag given on the command line wins
    "default": {},
    "cpu": dict(batch_prompts=16, n_eval_curve=12, ckpt_every=50, log_every=25),
    # smoke: tiny models with high learning rates, so that the warm student formats some of its samples and
    # every RL step has a reward spread, gated rows and a gradient (CI checks this), in about 10 s on a CPU
    "smoke": dict(teacher_steps=40, base_steps=10, warm_steps=40, teacher_lr=1e-2, sft_lr=1e-2, steps=6, sft_batch=16,
                  batch_prompts=4, n_pool=8, n_train=16, n_warm=16, n_test=4, n_cliff=8, eval_every=3, n_eval_curve=2,
                  ckpt_every=2, log_every=2, student_width=32, student_layers=1, teacher_width=48, teacher_layers=1),
}
METHODS = ["grpo", "opd", "kdpo", "kepo"]  # kepo.METHODS, in the order tables list them
CHOICES = {"preset": list(PRESETS), "method": METHODS, "hint_mode": ["adaptive", "always"], "dtype": ["fp32", "bf16"]}
POSITIVE = [f.name for f in fields(Args) if f.type == "int" and f.name not in ("seed", "steps", "micro_batch")]
MAX_REWARD = 2  # r = accuracy + format


def parse_args(argv=None) -> Args:
    """Args from the preset and the flags; every flag is checked here, before any heavy import or work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="train_small.py [flags] (--help lists them)")
    for f in fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                                help=f"{help} (default: {f.default!r})")
    given = vars(parser.parse_args(argv))
    a = Args(**{**PRESETS[given.get("preset", "default")], **given})
    problem = check_args(a)
    if problem:
        parser.error(problem)
    return a


def check_args(a: Args) -> str | None:
    """The first problem with the flags, in words, or None."""
    small, world = [n for n in POSITIVE if getattr(a, n) < 1], int(os.environ.get("WORLD_SIZE", "1"))
    checks = [
        (not small, f"--{small[0].replace('_', '-') if small else ''} must be >= 1"),
        (a.group_size >= 2, "--group-size must be >= 2: advantages compare the samples of a group"),
        (a.steps >= 0 and a.micro_batch >= 0, "--steps and --micro-batch must be >= 0"),
        (0 <= a.tau <= MAX_REWARD, f"--tau must be in [0, {MAX_REWARD}] (r = accuracy + format)"),
        (a.lr > 0 and a.teacher_lr > 0 and a.sft_lr > 0, "learning rates must be > 0"),
        (a.n_train >= a.batch_prompts, f"--n-train {a.n_train} must be >= --batch-prompts {a.batch_prompts}"),
        (a.n_cliff <= a.n_train, f"--n-cliff {a.n_cliff} must be <= --n-train {a.n_train}"),
        (bool(a.student) == bool(a.teacher), "--student and --teacher go together (every method but grpo needs "
                                             "the teacher, and the table compares with it)"),
        (not a.shard or world > 1, "--shard needs torchrun with 2 or more processes"),
        (a.batch_prompts % world == 0, f"--batch-prompts {a.batch_prompts} must divide among {world} processes"),
        (a.device in ("auto", "cpu") or a.device.split(":")[0] == "cuda", f"--device {a.device}: auto, cpu, cuda[:N]"),
        (not a.data or os.path.isfile(a.data), f"--data {a.data}: no such file"),
    ] + [(not p or os.path.isfile(os.path.join(p, "config.json")), f"--{flag} {p}: not a checkpoint folder (no "
          "config.json)") for flag, p in (("student", a.student), ("teacher", a.teacher))]
    return next((why for ok, why in checks if not ok), None)


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports (torch, transformers): --help and a bad flag answer at once

# transformers warns at import about optional backends (torchvision) that the toy does not need
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402
from transformers import (AutoModelForImageTextToText, AutoProcessor, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast, Qwen2Config,
                          SiglipImageProcessor, SiglipVisionConfig)
from transformers.utils import logging as hf_logging  # noqa: E402

import kepo  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype


class UserError(ValueError):
    """A problem with the user's input or files: the CLI prints it in one line, without a traceback."""


def kepo_config(a: Args) -> kepo.KEPOConfig:
    """The one KEPOConfig of a run: the flags that set it, the authors' defaults for the rest."""
    return kepo.KEPOConfig(group_size=a.group_size, max_new_tokens=a.max_new_tokens, max_hint_tokens=a.max_new_tokens,
                           tau=a.tau, hint_mode=a.hint_mode, micro_batch_size=a.micro_batch or None)


# ---- Stage 4: RL on the train modality, one kepo.kepo_step per batch of prompts ----------------------------------
@dataclass
class Stages:
    """What stages 1-3 leave for RL and evaluation, shared by every method of a seed."""
    proc: object  # processor (tokenizer + image processor) of student and teacher
    teacher: torch.nn.Module
    student_src: str  # folder of the warm student: every method starts from it
    data: Data
    before: dict  # the measurements before RL (before_rl.json)
    master: bool  # rank 0 (or the only process): the one that prints and writes files


RANK_SEED_STRIDE = 7919  # a prime: each rank's sampling seed, far from the next run's seed
PROGRESS_SECONDS = 10  # a progress line at least this often, in every stage


def rl(a: Args, cfg: kepo.KEPOConfig, s: Stages, run_dir: str, settings: dict):
    """RL from the warm student with kepo.kepo_step; returns the trained student. Metrics go to metrics.jsonl.
    Under torchrun every rank takes its slice of each step's prompts; rank 0 writes."""
    world = kepo.world_size()
    ref = frozen(load_model(s.student_src, home(a), "the warm student", DTYPES[a.dtype]), a)  # for the kl metric
    student, opt, start = rl_start(a, run_dir, s.student_src)
    # find_unused_parameters: VLMs hold weights no loss reaches (SigLIP's pooling head, for one)
    ddp = world > 1 and not a.shard
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if ddp else student
    log = Progress(run_dir, start, a, s.master)
    for step in range(start + 1, a.steps + 1):
        # the step's prompts are a function of (seed, step) alone, so a resumed run sees the same ones
        exs = random.Random(f"{a.seed}-rl-{step}").sample(s.data.train, a.batch_prompts)[rank()::world]
        with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.dtype == "bf16"):
            m = kepo.kepo_step(model, opt, s.proc.tokenizer, student_prompts(s.proc, exs, a.device),
                               [e.answer for e in exs], cfg, a.method, teacher=s.teacher, ref_model=ref,
                               hint_prompts=hint_prompts(exs, s.proc, a.device))
        m = reduce_metrics(m) | {"step": step}
        if step % a.eval_every == 0 or step == a.steps:
            t = time.time()
            m["eval/OOD"] = summarize(s.data.curve, correctness(student, s.proc, s.data.curve, cfg, a.device),
                                      s.data)["OOD"]
            m["time/eval"] = time.time() - t
        log.step(m)
        if step % a.ckpt_every == 0:  # with every rank's RNG state: a resumed run samples as this one would have
            rng = gather((torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
            save_state(os.path.join(run_dir, "ckpt.pt"), student, opt, step=step, rng=rng, settings=settings)
    weights = get_model_state_dict(student, options=WHOLE)  # a collective when sharded
    if s.master:  # a plain checkpoint: from_pretrained loads it in one process, sharded or not
        save_atomically(os.path.join(run_dir, "student"), lambda d: (student.save_pretrained(d, state_dict=weights),
                                                                      s.proc.save_pretrained(d)))
    return student


def student_prompts(proc, exs: list[Example], device) -> kepo.PromptBatch:
    """The hint-free prompts of a step, worded for the model (see `chat`)."""
    return encode(proc, exs, [prompt_text(e, chat(proc)) for e in exs], device)


def hint_prompts(exs: list[Example], proc, device) -> kepo.HintPrompts:
    """The two hint prompt builders kepo_step needs, for this step's prompts (indices into exs)."""
    words, pick = chat(proc), lambda idx: [exs[i] for i in idx]
    return kepo.HintPrompts(
        request=lambda idx: encode(proc, pick(idx), [hint_request_text(e, words) for e in pick(idx)], device),
        hinted=lambda idx, hints: encode(proc, pick(idx), [hinted_text(e, h, words) for e, h in zip(pick(idx), hints)],
                                         device))


def rl_start(a: Args, run_dir: str, student_src: str):
    """(student, optimizer, last finished step): from the run's checkpoint with --resume, else fresh."""
    student = load_model(student_src, home(a), "the warm student")
    if a.shard:
        shard(student, a.device)  # before the optimizer: it holds this rank's shards
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    ckpt = os.path.join(run_dir, "ckpt.pt")
    if not (a.resume and os.path.exists(ckpt)):
        torch.manual_seed(a.seed + RANK_SEED_STRIDE * rank())  # rank 0 samples as a single process does
        return student, opt, 0
    state = load_state(ckpt, student, opt)  # its settings, world size included, were checked before any work
    cpu_rng, cuda_rng = state["rng"][rank()]
    torch.set_rng_state(cpu_rng)
    if cuda_rng:
        torch.cuda.set_rng_state_all(cuda_rng)
    print(f"resumed {run_dir} at step {state['step']}")
    return student, opt, state["step"]


class Progress:
    """metrics.jsonl (rank 0) and a progress line every log_every steps or PROGRESS_SECONDS, with steps/s and ETA."""

    def __init__(self, run_dir: str, start: int, a: Args, master: bool):
        self.path, self.start, self.a, self.master = Path(run_dir, "metrics.jsonl"), start, a, master
        self.t0 = self.shown = time.time()
        if master:  # drop lines logged after the checkpoint we resume from
            self.path.write_text("".join(json.dumps(m) + "\n" for m in read_metrics(run_dir) if m["step"] <= start))

    def step(self, m: dict):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")
        steps, now = self.a.steps, time.time()
        if m["step"] % self.a.log_every and m["step"] != steps and now - self.shown < PROGRESS_SECONDS:
            return
        self.shown, rate = now, (m["step"] - self.start) / (now - self.t0)
        print(f"  step {m['step']:4d}/{steps} reward {m['reward']:.2f} acc {m['sample_accuracy']:.2f} "
              f"cliff {m['cliff_groups']:.2f} gate {m.get('gate_frac', 0):.2f} "
              f"hint-acc {m.get('hint_accept_rate', 0):.2f} | {rate:.2f} steps/s ETA {(steps - m['step']) / rate:.0f}s")


# ---- Stage 5 and the premises: greedy accuracy, chance, the learning cliff ---------------------------------------
EVAL_BATCH = 256  # rows per generate call in evaluation
# The toy's premises, checked before RL (README, "The toy's premises"); calibrated on these alone, never on RL outcomes
TEACHER_MIN_QTYPE = 0.90  # teacher accuracy on every question type, all modalities pooled
TEACHER_MIN_MODALITY = 0.85  # teacher accuracy on every modality
ROOM = 0.15  # warm student: OOD >= chance + ROOM (transfer exists), ID and OOD <= teacher - ROOM (room to distil)
CLIFF_MIN = 0.15  # share of train prompts whose G samples are all wrong before RL
BASE_MIN = 0.85  # base student: names the organ right, on every modality


@torch.no_grad()
def completions(model, proc, examples: list[Example], texts: list[str], cfg: kepo.KEPOConfig, device, group_size=1,
                temperature=0.0, max_new_tokens=0) -> list[str]:
    """len(examples) * group_size completions of the prompts `texts`, in batches of about EVAL_BATCH rows. Under
    torchrun every rank completes an equal slice (a sharded model needs every rank in each call) and gets them all."""
    world, n, out, step = kepo.world_size(), len(examples) * group_size, [], max(EVAL_BATCH // group_size, 1)
    share = -(-len(examples) // world)
    pad, mine = share * world - len(examples), slice(rank() * share, (rank() + 1) * share)
    examples, texts = (examples + examples[-1:] * pad)[mine], (texts + texts[-1:] * pad)[mine]  # padded by copies
    for i in range(0, share, step):
        batch = encode(proc, examples[i:i + step], texts[i:i + step], device)
        out += kepo.generate_rollouts(model, proc.tokenizer, batch, group_size, temperature=temperature,
                                      top_p=cfg.top_p, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                                      suppress=kepo.suppressed_ids(proc.tokenizer, model)).texts
    return sum(gather(out), [])[:n]


def correctness(model, proc, examples: list[Example], cfg: kepo.KEPOConfig, device, group_size=1,
                temperature=0.0) -> torch.Tensor:
    """[len(examples) * group_size] 1.0 where the completion's answer letter is right (greedy by default)."""
    texts = completions(model, proc, examples, [prompt_text(e, chat(proc)) for e in examples], cfg, device,
                        group_size, temperature)
    return kepo.accuracy_reward(texts, [e.answer for e in examples for _ in range(group_size)])


def chance(examples: list[Example]) -> torch.Tensor:
    """[len(examples)] the expected accuracy of a uniform guess: 1 / the question's number of options."""
    return torch.tensor([1 / len(e.options) for e in examples])


def summarize(examples: list[Example], correct: torch.Tensor, data: Data) -> dict:
    """Accuracy per modality and per question type, and the ID (train modality) and OOD means."""
    def mean_where(pred):
        hits = [c for e, c in zip(examples, correct.tolist()) if pred(e)]
        return sum(hits) / max(len(hits), 1)
    res = {m: mean_where(lambda e, m=m: e.modality == m) for m in data.modalities}
    res.update({f"q/{q}": mean_where(lambda e, q=q: e.qtype == q) for q in data.qtypes})
    ood = [m for m in data.modalities if m != data.train_modality]
    res["ID"] = res[data.train_modality]
    res["OOD"] = sum(res[m] for m in ood) / max(len(ood), 1)
    return res


def cliff_mask(model, proc, examples: list[Example], cfg: kepo.KEPOConfig, device) -> list[bool]:
    """Per prompt: are all G samples (sampled as in RL) wrong? The learning cliff, as kepo_step's trigger sees it."""
    correct = correctness(model, proc, examples, cfg, device, cfg.group_size, cfg.temperature)
    cliff = set(kepo.cliff_groups(correct, correct, cfg.group_size, "accuracy"))
    return [i in cliff for i in range(len(examples))]


def premises(rows: dict, cliff: float, described: dict | None) -> list[dict]:
    """The toy's premises (a miniature is worth running only if they hold), measured before RL."""
    t, s, c = rows["teacher"], rows["student (before RL)"], rows["chance"]
    worst_q = min((k for k in t if k.startswith("q/")), key=t.get)
    worst_m = min((k for k in t if not k.startswith("q/") and k not in ("ID", "OOD")), key=t.get)
    items = [
        (f"teacher accuracy, worst question type ({worst_q[2:]})", t[worst_q], TEACHER_MIN_QTYPE, None),
        (f"teacher accuracy, worst modality ({worst_m})", t[worst_m], TEACHER_MIN_MODALITY, None),
        ("warm student OOD accuracy", s["OOD"], c["OOD"] + ROOM, t["OOD"] - ROOM),
        ("warm student ID accuracy", s["ID"], None, t["ID"] - ROOM),
        ("learning cliff: train prompts with all G samples wrong", cliff, CLIFF_MIN, None),
    ]
    if described is not None:
        worst_d = min(described, key=described.get)
        items.append((f"base student names the organ, worst modality ({worst_d})", described[worst_d], BASE_MIN, None))
    return [{"premise": n, "value": v, "min": lo, "max": hi,
             "holds": (lo is None or v >= lo) and (hi is None or v <= hi)} for n, v, lo, hi in items]


def premises_table(befores: dict[int, dict]) -> list[str]:
    """One row per premise, one column per seed (✗: it does not hold), and the first seed's target. Over seeds,
    a premise is named without its worst modality or question type, which differs by seed."""
    seeds = sorted(befores)
    cell = lambda p: f"{p['value']:.3f}" + ("" if p["holds"] else " ✗")  # noqa: E731
    target = lambda p: " and ".join(f"{op} {x:.2f}" for op, x in ((">=", p["min"]), ("<=", p["max"]))  # noqa: E731
                                    if x is not None)
    rows = [[p["premise"] if len(seeds) == 1 else p["premise"].split(" (")[0],
             *(cell(befores[s]["premises"][i]) for s in seeds), target(p)]
            for i, p in enumerate(befores[seeds[0]]["premises"])]
    return md_table(["premise", *(f"seed {s}" for s in seeds), f"target (seed {seeds[0]})"], rows) + [""]


def before_rl(a: Args, cfg: kepo.KEPOConfig, proc, teacher, student, data: Data) -> dict:
    """Chance, teacher and warm-student accuracy, the learning cliff, the base student's descriptions and the
    premises they make, before RL; cached in the seed's folder, keyed by what produced them."""
    path = os.path.join(seed_root(a), "before_rl.json")
    key = as_json({"student": os.path.abspath(a.student) if a.student else "student_init",
                   "teacher": os.path.abspath(a.teacher) if a.teacher else "toy", "data": data.fingerprint,
                   "train_modality": data.train_modality, "n_test": a.n_test, "n_cliff": a.n_cliff,
                   "group_size": a.group_size})
    cached = read_json(path) if os.path.exists(path) else {}
    if cached.get("key") == key:
        return cached
    require_single_process(path)
    start = time.time()
    torch.manual_seed(a.seed)
    mask = cliff_mask(student, proc, data.cliff, cfg, a.device)
    rows = {"chance": summarize(data.test, chance(data.test), data),
            "teacher": summarize(data.test, correctness(teacher, proc, data.test, cfg, a.device), data),
            "student (before RL)": summarize(data.test, correctness(student, proc, data.test, cfg, a.device), data)}
    described, base = None, stage_paths(a).get("base")
    if base:  # the base premise: per modality, the share of test images whose greedy description names the organ
        texts = completions(load_model(base, a.device, "the base stage"), proc, data.test,
                            [DESCRIBE_PROMPT] * len(data.test), cfg, a.device, max_new_tokens=DESCRIBE_TOKENS)
        hits = torch.tensor([float(f"organ {e.case.organ}" in t) for e, t in zip(data.test, texts)])
        described = {m: v for m, v in summarize(data.test, hits, data).items() if m in data.modalities}
    by_type = summarize(data.cliff, torch.tensor(mask, dtype=torch.float), data)  # every cliff prompt is ID
    cliff = {q: by_type[f"q/{q}"] for q in data.qtypes} | {"all": by_type["ID"]}
    before = {"rows": rows, "cliff": cliff, "cliff_mask": mask, "base_describes": described,
              "premises": premises(rows, cliff["all"], described), "seconds": time.time() - start, "key": key}
    write_json(path, before)
    return before


def md_table(head: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table, numbers to 3 decimals: what the console shows and the report writes."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in cells]


# ---- Stages 1-3: supervised fine-tuning of the teacher, the base student and its warm-up -------------------------
HINT_SHARE = 0.25  # of the teacher's SFT prompts ask for a hint given the answer; the rest ask the question
HINTED_SHARE = 0.3  # of the warm-up prompts carry the correct hint, so the student can use one in RL
REPLAY_SHARE = 0.5  # of each warm-up batch replays the base's describe task on every modality
MAX_GRAD_NORM = 1.0  # gradient clipping of the supervised stages
SFT_SAVE_SECONDS = 30  # a stage in progress saves its state this often; a rerun continues from it
PRETRAIN_SEED = 0  # teacher and base student stand for released checkpoints: trained once per preset, shared by seeds


def teacher_stage(a: Args, proc, data: Data):
    """Stage 1: the teacher, a stand-in for a large VLM that knows the task on every modality."""
    config = stage_config(a, data, (a.teacher_width, a.teacher_layers), a.teacher_steps, a.teacher_lr)
    return sft_stage(a, stage_paths(a)["teacher"], config, proc,
                     lambda: build_vlm(proc.tokenizer, a.teacher_width, a.teacher_layers),
                     partial(teacher_batch, pool=data.pool), PRETRAIN_SEED,
                     "stage 1: teacher SFT on every modality, also writing hints (shared by every seed)")


def base_stage(a: Args, proc, data: Data):
    """Stage 2: the base student, a stand-in for a pretrained VLM: it describes images of every modality.
    Returns its config, or None without a base stage (JSONL data has no descriptions)."""
    path = stage_paths(a).get("base")
    if not path:
        return None
    config = stage_config(a, data, (a.student_width, a.student_layers), a.base_steps, a.sft_lr)
    sft_stage(a, path, config, proc, lambda: build_vlm(proc.tokenizer, a.student_width, a.student_layers),
              partial(describe_batch, pool=data.pool), PRETRAIN_SEED,
              "stage 2: base student pretraining, describing images of every modality (shared by every seed)")
    return read_json(os.path.join(path, "stage.json"))["config"]


def student_stage(a: Args, proc, data: Data, base: dict | None):
    """Stage 3: warm-up SFT of the base student on train-modality questions (per seed). The base's vision tower is
    frozen: warm-up teaches the answer format and the option lookup without retuning perception to the train
    modality alone, and half of every batch replays the base's describe task on every modality, so that what the
    base perceives is not forgotten."""
    config = stage_config(a, data, (a.student_width, a.student_layers), a.warm_steps, a.sft_lr) | {
        "n_warm": a.n_warm, "modality": data.train_modality, "base": base or "",
        "frozen": "vision_tower" if base else "", "replay": REPLAY_SHARE if base else 0.0}

    def init():
        if not base:
            return build_vlm(proc.tokenizer, a.student_width, a.student_layers)
        model = load_model(stage_paths(a)["base"], "cpu", "the base stage")
        model.model.vision_tower.requires_grad_(False)  # perception stays pretrained, as in LLaVA instruction tuning
        return model
    batches = partial(warmup_batch, warm_set=data.warm, pool=data.pool if base else [])
    return sft_stage(a, stage_paths(a)["warm-up"], config, proc, init, batches, a.seed + 1,
                     f"stage 3: student warm-up SFT on {len(data.warm)} {data.train_modality} questions")


def stage_config(a: Args, data: Data, size: tuple, steps: int, lr: float) -> dict:
    """What a supervised stage is a function of: a cached stage is reused only if this matches."""
    return {"size": list(size), "steps": steps, "batch": a.sft_batch, "lr": lr, "data": data.fingerprint,
            "pool": len(data.pool), "image": [IMAGE_SIZE, PATCH]}


def sft_stage(a: Args, path: str, config: dict, proc, init, draw_batch, seed: int, title: str):
    """A cached supervised stage: the model in `path` if it finished with `config`, else init() trained and saved."""
    if os.path.exists(os.path.join(path, "stage.json")):
        saved = read_json(os.path.join(path, "stage.json"))["config"]
        if saved != as_json(config):
            raise UserError(f"cached stage {path} was built with {saved}, not {config}; use another --out or delete it")
        return load_model(path, home(a), "cached stage")
    require_single_process(path)
    print(f"{title} ({config['steps']} steps x {config['batch']})")
    torch.manual_seed(seed)
    model = init().to(a.device)
    times = sft(model, proc, draw_batch, config, a.device, os.path.basename(path), seed, path + ".partial.pt")
    save_atomically(path, lambda d: (model.save_pretrained(d), proc.save_pretrained(d),
                                     write_json(os.path.join(d, "stage.json"), {"config": config, "times": times})))
    Path(path + ".partial.pt").unlink(missing_ok=True)
    return model


def sft(model, proc, draw_batch, config: dict, device, name: str, seed: int, state_path: str) -> dict:
    """AdamW on batches (examples, prompts, targets) = draw_batch(rng, batch), cross-entropy on targets only. Saves
    its state to `state_path` every SFT_SAVE_SECONDS and continues from it when rerun. Returns the wall time and the
    share of it spent preparing batches (drawing, tokenizing, moving)."""
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    rng = random.Random(f"sft-{name}-{seed}")
    clock = resume_sft(state_path, config, model, opt, rng)
    steps, start, saved, shown = config["steps"], time.time() - clock["seconds"], time.time(), time.time()
    for step in range(clock["step"] + 1, steps + 1):
        t = time.perf_counter()
        examples, prompts, targets = draw_batch(rng, config["batch"])
        batch = encode(proc, examples, prompts, device, targets)
        labels = batch.input_ids.clone()  # prompt and padding are labelled -100: only targets are learned
        for i, n in enumerate(len(ids) for ids in token_ids(proc.tokenizer, targets)):
            labels[i, :labels.shape[1] - n] = -100
        clock["data"] += time.perf_counter() - t
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        clock.update(step=step, seconds=time.time() - start)
        if time.time() - saved > SFT_SAVE_SECONDS and step < steps:
            saved = save_state(state_path, model, opt, config=config, rng=rng.getstate(), clock=clock)
        if time.time() - shown > PROGRESS_SECONDS or step == steps:
            shown, rate = time.time(), step / clock["seconds"]
            print(f"  [{name}] step {step}/{steps} loss {loss.item():.3f} | {rate:.1f} steps/s "
                  f"ETA {(steps - step) / rate:.0f}s")
    return {"seconds": round(clock["seconds"], 1), "data_share": round(clock["data"] / clock["seconds"], 4)}


def resume_sft(state_path: str, config: dict, model, opt, rng: random.Random) -> dict:
    """The clock (step, seconds, data seconds) of the stage's saved state, loaded into model, opt and rng."""
    fresh = {"step": 0, "seconds": 0.0, "data": 0.0}
    if not os.path.exists(state_path):
        return fresh
    state = load_state(state_path, model, opt, config=config)
    print(f"  {state_path}: " + ("saved with other settings, starting over" if state is None else
                              f"continuing at step {state['clock']['step']}"))
    if state is None:
        return fresh
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return state["clock"]


def teacher_batch(rng: random.Random, n: int, pool: list[Example]):
    """Teacher data, every modality: fresh questions about bank images (or the JSONL pool's); some write a hint."""
    exs = [rng.choice(pool) for _ in range(n)]
    exs = [any_question(rng, e) if e.case else e for e in exs]
    hint = [rng.random() < HINT_SHARE for _ in exs]
    return (exs, [hint_request_text(e) if h else prompt_text(e) for e, h in zip(exs, hint)],
            [hint_text(e) if h else answer_text(e) for e, h in zip(exs, hint)])


def describe_batch(rng: random.Random, n: int, pool: list[Example]):
    """Base-student data, every modality: describe the image in words (no question, no options)."""
    exs = [rng.choice(pool) for _ in range(n)]
    return exs, [DESCRIBE_PROMPT] * n, [describe_text(e.case) for e in exs]


def warmup_batch(rng: random.Random, n: int, warm_set: list[Example], pool: list[Example]):
    """Student warm-up: train-modality questions, some with the (correct) hint so that hints are usable, mixed
    with the base's describe task on every modality (replay, when there is a base) so perception is not forgotten."""
    n_replay = int(n * REPLAY_SHARE) if pool else 0
    exs = [rng.choice(warm_set) for _ in range(n - n_replay)]
    prompts = [hinted_text(e, e.evidence) if rng.random() < HINTED_SHARE else prompt_text(e) for e in exs]
    replay = describe_batch(rng, n_replay, pool)
    return exs + replay[0], prompts + replay[1], [answer_text(e) for e in exs] + replay[2]


def pretrained_stages(a: Args):
    """Stages 1-3 replaced by local checkpoints: (processor, teacher, student)."""
    procs = []
    for flag, path in (("--student", a.student), ("--teacher", a.teacher)):
        try:
            procs.append(AutoProcessor.from_pretrained(path))
        except Exception as e:
            raise UserError(f"{flag} {path}: cannot load its processor ({type(e).__name__}: {e})") from e
    if procs[0].tokenizer.get_vocab() != procs[1].tokenizer.get_vocab():
        raise UserError(f"--teacher {a.teacher} and --student {a.student} have different vocabularies; "
                        "token-level distillation needs one tokenizer")
    return procs[0], load_model(a.teacher, home(a), "--teacher", DTYPES[a.dtype]), load_model(a.student, home(a),
                                                                                              "--student")


# ---- Models and prompts: the toy's tokenizer, processor and VLM, built from code (no download) -------------------
# The texts below are the user's turn; `encode` adds the image (and the chat template, if any). Two wordings:
# the toy's word-level models learn a bare layout in their supervised stages, while a checkpoint with a chat
# template (an instruction-tuned VLM, --student/--teacher) is asked in words for what kepo.py reads back.
# This is the only place either wording lives.
STUDENT_ASK = ("Think it through inside <think> </think> tags, then give the letter of the correct option "
               "inside <answer> </answer> tags.")
TEACHER_ASK = ("The correct answer is ({letter}) {truth}. Write a short hint inside <hint> </hint> tags that "
               "would lead a student to it, without stating the answer.")
HINTED_ASK = ("Hint: {hint}\nThe correct answer is ({letter}). Reason towards it without mentioning the hint "
              "or that you were given the answer.")  # the authors' "v1": the hint and the ground-truth answer


def chat(proc) -> bool:
    """Does the processor's model take instructions (a chat template), or the toy's bare layout?"""
    return bool(getattr(proc, "chat_template", None))


def prompt_text(ex: Example, words: bool = False) -> str:
    """The question and its options; `words`: in sentences, asking for the <think>/<answer> format."""
    if words:
        options = "\n".join(f"({string.ascii_lowercase[i]}) {o}" for i, o in enumerate(ex.options))
        return f"{ex.question}\n{options}\n{STUDENT_ASK}"
    options = " , ".join(f"{o} {string.ascii_lowercase[i]}" for i, o in enumerate(ex.options))
    return f"{ex.question} options {options}"


def hint_request_text(ex: Example, words: bool = False) -> str:
    """The teacher is shown the ground truth (option text and letter) and asked for a hint."""
    if words:
        return prompt_text(ex, True).replace(STUDENT_ASK, TEACHER_ASK.format(letter=ex.answer, truth=ex.truth))
    return f"{prompt_text(ex)} answer {ex.truth} {ex.answer} hint"


def hinted_text(ex: Example, hint: str, words: bool = False) -> str:
    """The authors' "v1" hint-aware prompt: the hint and the ground-truth answer."""
    if words:
        return f"{prompt_text(ex, True)}\n{HINTED_ASK.format(hint=hint, letter=ex.answer)}"
    return f"{prompt_text(ex)} hint {hint} answer {ex.answer}"


def answer_text(ex: Example) -> str:
    return f"<think> {ex.evidence} {ex.answer} </think> <answer> {ex.answer} </answer> <eos>"


def hint_text(ex: Example) -> str:
    return f"<hint> {ex.evidence} </hint> <eos>"


TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
DESCRIBE_PROMPT = "describe the image"  # the base student's pretraining task
DESCRIBE_TOKENS = 16  # the longest description is 13 words plus EOS
WORD_SPLIT = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
TOKEN_IDS = weakref.WeakKeyDictionary()  # tokenizer -> {text: ids}


def build_processor(extra: list[Example] = ()) -> LlavaProcessor:
    """A LlavaProcessor: a word-level tokenizer over the toy's words (and `extra`'s) and a SigLIP image processor."""
    words = set(LETTERS) | set(MODALITIES + ORGANS + FINDINGS + list(GRADES) + COUNTS)
    words |= {",", "left", "right", "options", "answer", "hint", "modality", "organ", "finding", "size", "count",
              "side"}
    words |= set(DESCRIBE_PROMPT.split())
    for q in [*filter(None, QUESTIONS.values()), *ATTRIBUTE_QUESTIONS.values()]:
        words |= set(q.split())
    for e in extra:
        words |= {w.lower() for w, _ in WORD_SPLIT.pre_tokenize_str(f"{prompt_text(e)} {e.answer}")}
    tok = word_tokenizer(sorted(words), ["<image>"], "<image>")
    images = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[PIXEL_MEAN] * 3,
                                  image_std=[PIXEL_STD] * 3)
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, image_token="<image>",
                          vision_feature_select_strategy="full", num_additional_image_tokens=0)


def word_tokenizer(words: list[str], specials: list[str], image_token: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased, split on spaces and punctuation, left padding) over
    pad/bos/eos/unk, `specials` (kept whole) and `words`, with KEPO's tags added as tokens."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", *specials, *words]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = WORD_SPLIT
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": image_token},
                                  padding_side="left")
    others = [s for s in specials if s != image_token]
    if others:
        tok.add_special_tokens({"additional_special_tokens": others})
    tok.add_tokens(TAGS)
    return tok


def build_vlm(tok, hidden: int, layers: int) -> LlavaForConditionalGeneration:
    """A LLaVA: SigLIP vision tower (IMAGE_TOKENS patches of PATCH x PATCH) + Qwen2 text model, random init."""
    vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=IMAGE_TOKENS,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(config)


def user_turn(proc, text: str) -> str:
    """The image and `text` as the model expects them: its chat template, else `<image> text`."""
    if chat(proc):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return proc.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return f"{proc.image_token} {text}"


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """The token ids of each text, cached per tokenizer: the toy's prompts and targets repeat, and
    tokenizing them again was most of the cost of preparing a batch."""
    cache = TOKEN_IDS.setdefault(tok, {})
    new = [t for t in dict.fromkeys(texts) if t not in cache]
    if new:
        cache.update(zip(new, tok(new).input_ids))
    return [cache[t] for t in texts]


def encode(proc, examples: list[Example], texts: list[str], device, targets: list[str] = ()) -> kepo.PromptBatch:
    """Prompts (plus SFT targets after them) with their images; every processor output but the text is vision.
    Bank images (the toy) skip the image processor: their text is expanded to IMAGE_TOKENS image tokens as
    LlavaProcessor does, and their pixels are normalised as SiglipImageProcessor does (a test checks both against
    the processor), which keeps data preparation cheap."""
    full = [user_turn(proc, t) + (f" {targets[i]}" if targets else "") for i, t in enumerate(texts)]
    if all(e.pixels is not None for e in examples):
        ids = token_ids(proc.tokenizer, [t.replace(proc.image_token, proc.image_token * IMAGE_TOKENS) for t in full])
        width = max(map(len, ids))  # left padding, as the toy's tokenizer pads
        enc = {"input_ids": torch.tensor([[proc.tokenizer.pad_token_id] * (width - len(i)) + i for i in ids]),
               "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
               "pixel_values": (torch.stack([e.pixels for e in examples]).float() * (1 / 255) - PIXEL_MEAN) / PIXEL_STD}
    else:
        images = [Image.open(e.image).convert("RGB") if e.image else draw(e.case) for e in examples]
        enc = proc(text=full, images=images, return_tensors="pt", padding=True)
    vision = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return kepo.PromptBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device), vision)


# ---- Toy medical VQA: cases, images, questions, and the splits of a run ------------------------------------------
MODALITIES = ["ct", "dermoscopy", "fundus", "mri", "microscopy", "oct", "ultrasound", "xray"]
ORGAN_SHAPES = {  # organ -> the ImageDraw calls that draw it (pixel coordinates)
    "brain": [("ellipse", (7, 6, 41, 42))],
    "lung": [("ellipse", (5, 6, 23, 43)), ("ellipse", (25, 6, 43, 43))],
    "liver": [("polygon", [(4, 7), (44, 7), (37, 42), (11, 42)])],
    "heart": [("polygon", [(24, 3), (45, 24), (24, 45), (3, 24)])],
}
ORGANS = list(ORGAN_SHAPES)
FINDINGS = ["normal", "tumor", "cyst", "bleed"]
GRADES = {"small": 3, "medium": 5, "large": 7}  # lesion radius in pixels
CYST_WALL = 2  # pixels: a cyst is a ring, a tumor a filled disc
BLUR_RADIUS = 0.6  # Gaussian blur of the drawn image, in pixels
NOISE_WEIGHT = {"fan": 40 / 255, "other": 14 / 255}  # weight of the uniform noise blended in (ultrasound is grainier)
COUNTS = ["one", "two", "three"]
SLOTS = [(16, 17), (32, 17), (16, 31), (32, 31)]  # lesion centres; x < 24 is "left"
QUESTIONS = {
    "modality": "what imaging modality is this ?",
    "anatomy": "which organ is shown ?",
    "diagnosis": "what is the finding ?",
    "grading": "what is the lesion size ?",
    "attribute": None,  # side or count, below
}
ATTRIBUTE_QUESTIONS = {"side": "on which side is the lesion ?", "count": "how many lesions are there ?"}
LETTERS = "abcd"
IMAGE_SIZE, PATCH = 48, 12  # 16 image tokens of 12x12: enough to see a 3-pixel lesion
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # the image processor's normalisation, per channel
# modality -> (background, organ, lesion) colours and field of view; findings keep their shape everywhere
STYLES = {
    "ct": ((0, 0, 0), (150, 150, 150), (60, 60, 60), "circle"),
    "dermoscopy": ((205, 155, 125), (150, 95, 65), (60, 35, 25), "vignette"),
    "fundus": ((0, 0, 0), (200, 90, 40), (250, 220, 120), "disc"),
    "mri": ((10, 10, 10), (100, 100, 100), (235, 235, 235), "full"),
    "microscopy": ((235, 185, 225), (165, 95, 175), (70, 30, 110), "dots"),
    "oct": ((30, 40, 70), (110, 135, 175), (5, 5, 15), "bands"),
    "ultrasound": ((0, 0, 0), (95, 95, 95), (20, 20, 20), "fan"),
    "xray": ((25, 25, 25), (205, 205, 205), (110, 110, 110), "ribs"),
}


@dataclass(frozen=True)
class Case:
    """One synthetic image: what is in it. `seed` fixes texture noise."""
    modality: str
    organ: str
    finding: str
    grade: str | None  # None for normal
    slots: tuple  # lesion centres, empty for normal
    seed: int


@dataclass(frozen=True)
class Example:
    """A multiple-choice question about a toy case or an image file; `evidence` is the checkable reasoning."""
    case: Case | None
    qtype: str
    question: str
    options: tuple
    answer: str  # lower-case letter
    evidence: str  # e.g. "size large": what the think block states and what a hint says
    modality: str
    image: str = ""  # image file (JSONL data); empty for toy cases, which are drawn
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [3, H, W] uint8, from the bank

    @property
    def truth(self) -> str:
        """The text of the correct option."""
        return self.options[string.ascii_lowercase.index(self.answer)]


def draw_field(d: ImageDraw.ImageDraw, style: str, bg: tuple, rng: random.Random):
    """The modality's field of view and texture, drawn before the anatomy."""
    s = IMAGE_SIZE
    if style == "circle":
        d.ellipse((2, 2, s - 3, s - 3), fill=(45, 45, 45))
    elif style == "disc":
        d.ellipse((3, 3, s - 4, s - 4), fill=(150, 50, 20))
        for _ in range(3):
            d.line((s // 2, s // 2, rng.randrange(s), rng.randrange(s)), fill=(120, 20, 10), width=1)
    elif style == "fan":
        d.pieslice((-s // 2, -s // 3, s + s // 2, s + s // 2), 55, 125, fill=(55, 55, 55))
    elif style == "vignette":
        d.ellipse((-6, -6, s + 5, s + 5), outline=(90, 60, 40), width=6)
    elif style == "dots":
        for _ in range(40):
            x, y = rng.randrange(s), rng.randrange(s)
            d.point((x, y), fill=(120, 60, 140))
    elif style == "bands":
        for y in range(4, s, 8):
            d.rectangle((0, y, s, y + 2), fill=tuple(c + 35 for c in bg))
    elif style == "ribs":
        for y in range(6, s, 9):
            d.arc((4, y - 6, s - 5, y + 10), 200, 340, fill=(150, 150, 150), width=2)


def draw_lesion(d: ImageDraw.ImageDraw, finding: str, center: tuple, r: int, color: tuple):
    x, y = center
    box = (x - r, y - r, x + r, y + r)
    if finding == "tumor":
        d.ellipse(box, fill=color)
    elif finding == "cyst":
        d.ellipse(box, outline=color, width=CYST_WALL)
    else:  # bleed
        d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=color)


def draw(case: Case) -> Image.Image:
    """The case as a 48x48 RGB image: field, organ, lesions, a light blur and seeded noise."""
    rng = random.Random(case.seed)
    bg, organ_color, lesion_color, style = STYLES[case.modality]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    draw_field(d, style, bg, rng)
    for shape, xy in ORGAN_SHAPES[case.organ]:
        getattr(d, shape)(xy, fill=organ_color)
    for slot in case.slots:
        draw_lesion(d, case.finding, slot, GRADES[case.grade], lesion_color)
    img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    noise = Image.frombytes("L", img.size, rng.randbytes(IMAGE_SIZE * IMAGE_SIZE)).convert("RGB")
    return Image.blend(img, noise, NOISE_WEIGHT["fan" if style == "fan" else "other"])


def side(case: Case) -> str:
    return "left" if case.slots[0][0] < IMAGE_SIZE // 2 else "right"


def ask(rng: random.Random, case: Case, qtype: str, attribute: str | None) -> Example:
    """A multiple-choice question of `qtype` about `case`, options shuffled."""
    n = len(case.slots)
    truth, choices, key = {
        "modality": (case.modality, rng.sample([m for m in MODALITIES if m != case.modality], 3) + [case.modality],
                     "modality"),
        "anatomy": (case.organ, list(ORGANS), "organ"),
        "diagnosis": (case.finding, list(FINDINGS), "finding"),
        "grading": (case.grade, list(GRADES), "size"),
        "attribute": ((side(case), ["left", "right"], "side") if attribute == "side"
                      else (COUNTS[n - 1] if n else None, list(COUNTS), "count")),
    }[qtype]
    rng.shuffle(choices)
    question = QUESTIONS[qtype] or ATTRIBUTE_QUESTIONS[attribute]
    return Example(case, qtype, question, tuple(choices), LETTERS[choices.index(truth)], f"{key} {truth}",
                   case.modality)


def any_question(rng: random.Random, ex: Example) -> Example:
    """A fresh question about the image of `ex` (a bank image): any type the case can answer."""
    n = len(ex.case.slots)
    qtype = rng.choice(list(QUESTIONS) if n else ["modality", "anatomy", "diagnosis"])
    attribute = rng.choice(["side", "count"] if n == 1 else ["count"]) if qtype == "attribute" else None
    return replace(ask(rng, ex.case, qtype, attribute), pixels=ex.pixels)


def describe_text(case: Case) -> str:
    """The base student's pretraining target: the image in words, not a multiple-choice answer."""
    words = [f"modality {case.modality}", f"organ {case.organ}", f"finding {case.finding}"]
    if case.slots:
        words += [f"size {case.grade}", f"count {COUNTS[len(case.slots) - 1]}"]
    if len(case.slots) == 1:
        words.append(f"side {side(case)}")
    return " ".join(words) + " <eos>"


def make_split(seed: int, name: str, modality: str, n: int) -> list[Example]:
    """A fixed split, the same for the same (seed, name, modality): each question's type is drawn uniformly from
    the five, about a new case that can answer it (grading and attribute need a lesion, "side" exactly one)."""
    rng, split = random.Random(f"{seed}-{name}-{modality}"), []
    for _ in range(n):
        qtype = rng.choice(list(QUESTIONS))
        attribute = rng.choice(list(ATTRIBUTE_QUESTIONS)) if qtype == "attribute" else None
        finding = rng.choice(FINDINGS[1:] if qtype in ("grading", "attribute") else FINDINGS)
        k = 0 if finding == "normal" else 1 if attribute == "side" else rng.randint(1, len(SLOTS) - 1)
        case = Case(modality, rng.choice(ORGANS), finding, rng.choice(list(GRADES)) if k else None,
                    tuple(rng.sample(SLOTS, k)), rng.randrange(2**31))
        split.append(ask(rng, case, qtype, attribute))
    return split


def with_pixels(examples: list[Example], path: str) -> list[Example]:
    """The examples with their images as uint8 tensors, drawn once and cached in `path` (a bank file). Drawing and
    preprocessing every batch would bound the supervised stages on CPU; the bank is checked against the cases'
    seeds, so a stale file is redrawn, never misused."""
    seeds = [e.case.seed for e in examples]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bank = torch.load(path, weights_only=True) if os.path.exists(path) else None
    if bank is None or bank["seeds"].tolist() != seeds:
        print(f"drawing {len(examples)} images into {path}")
        pixels = torch.stack([torch.frombuffer(bytearray(draw(e.case).tobytes()), dtype=torch.uint8)
                              .view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1) for e in examples])
        bank = {"seeds": torch.tensor(seeds), "pixels": pixels}
        tmp = f"{path}.{os.getpid()}.tmp"  # torchrun ranks may draw the same bank at once
        torch.save(bank, tmp)
        os.replace(tmp, path)
    return [replace(e, pixels=p) for e, p in zip(examples, bank["pixels"])]


@dataclass
class Data:
    """The questions of a run: fixed splits of the toy or of a JSONL file."""
    modalities: list[str]
    qtypes: list[str]
    train_modality: str
    train: list[Example]  # RL prompts, all of the train modality
    warm: list[Example]  # the student's warm-up SFT set (train modality)
    test: list[Example]  # held-out questions of every modality
    curve: list[Example]  # the held-out subset evaluated during RL (the OOD curve)
    cliff: list[Example]  # train prompts on which the learning cliff is measured
    pool: list[Example]  # teacher and base pretraining images/questions, every modality
    fingerprint: str  # names the data in cached stages


def toy_data(a: Args) -> Data:
    """Fixed toy splits for a.seed, with their images from the bank; the pool (for the teacher and base stages)
    is the preset's, shared by seeds."""
    if a.train_modality not in MODALITIES:
        raise UserError(f"--train-modality {a.train_modality}: the toy has {MODALITIES}")
    root = seed_root(a)
    os.makedirs(root, exist_ok=True)

    def split(name: str, modalities: list[str], n: int, seed: int = a.seed, folder: str = root) -> list[Example]:
        exs = [e for m in modalities for e in make_split(seed, name, m, n)]
        # the bank holds pixels as the toy's processor makes them; a checkpoint's own processor draws per batch
        return exs if a.student else with_pixels(exs, os.path.join(folder, f"bank-{name}.pt"))
    train = split("train", [a.train_modality], a.n_train)
    pool = [] if a.student else split("pool", MODALITIES, a.n_pool, PRETRAIN_SEED,
                                      os.path.join(a.out, f"{tag(a)}-bank"))
    return Data(MODALITIES, list(QUESTIONS), a.train_modality, train,
                warm=split("warm", [a.train_modality], a.n_warm), test=split("test", MODALITIES, a.n_test),
                curve=split("curve", MODALITIES, a.n_eval_curve), cliff=train[:a.n_cliff], pool=pool,
                fingerprint="toy")


# ---- Real data instead of the toy (--data): OmniMedVQA-style JSONL, checked before training ----------------------
HOLDOUT_SHARE = 0.2  # at most this share of each modality's questions is held out for evaluation
FIELDS = {"image": str, "question": str, "options": list, "answer": str, "modality": str, "qtype": str}


def parse_record(line: str, folder: str) -> Example:
    """One JSONL line -> Example; ValueError says what is wrong. Image paths are relative to the file."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in FIELDS if k not in rec]
    wrong = [k for k, t in FIELDS.items() if k in rec and not (isinstance(rec[k], t) and rec[k])]
    if missing or wrong:
        raise ValueError(f"missing fields {missing}" if missing else f"empty or mistyped fields {wrong}")
    options = rec["options"]
    if not 2 <= len(options) <= len(string.ascii_lowercase) or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"options must be 2-26 non-empty strings, got {options!r}")
    answer = rec["answer"].strip().lower()
    if len(answer) != 1 or answer not in string.ascii_lowercase[:len(options)]:
        raise ValueError(f"answer {rec['answer']!r} is not one of the letters of the {len(options)} options")
    path = os.path.join(folder, rec["image"])
    truth = options[string.ascii_lowercase.index(answer)]
    return Example(None, rec["qtype"], rec["question"], tuple(options), answer, truth, rec["modality"], path)


def image_error(path: str) -> str | None:
    """Why the image cannot be used, or None. Decodes every pixel: a truncated file fails here, not in training."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def load_jsonl(path: str) -> list[Example]:
    """Every record of a JSONL file; the first bad one stops the run with file:line and the reason."""
    examples, numbers = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(parse_record(line, os.path.dirname(os.path.abspath(path))))
            except ValueError as e:
                raise UserError(f"{path}:{number}: {e}") from None
            numbers.append(number)
    if not examples:
        raise UserError(f"{path}: no records")
    with ThreadPoolExecutor() as pool:  # PIL decodes outside the GIL: threads use every core
        errors = list(pool.map(image_error, [e.image for e in examples]))
    for number, e, error in zip(numbers, examples, errors):
        if error:
            raise UserError(f"{path}:{number}: image {e.image} cannot be read ({error})")
    return examples


def jsonl_data(a: Args) -> Data:
    """Per modality, a shuffle keyed by the file holds out min(n_test, 20%) questions for evaluation; the rest
    trains. The split depends on the file alone, not on --seed: the teacher, trained once per file on the rest,
    never sees a question of any seed's test set."""
    examples = load_jsonl(a.data)
    fingerprint = hashlib.sha1(Path(a.data).read_bytes()).hexdigest()[:12]
    by_modality = {}
    for e in examples:
        by_modality.setdefault(e.modality, []).append(e)
    if a.train_modality not in by_modality:
        raise UserError(f"--train-modality {a.train_modality} is not in {a.data} (it has {sorted(by_modality)})")
    test, pool = {}, {}
    for m, exs in sorted(by_modality.items()):
        exs = random.Random(f"{fingerprint}-split-{m}").sample(exs, len(exs))
        n = max(1, min(a.n_test, int(len(exs) * HOLDOUT_SHARE)))
        test[m], pool[m] = exs[:n], exs[n:]
    train = pool[a.train_modality]
    if len(train) < a.batch_prompts:
        raise UserError(f"{a.data}: {len(train)} {a.train_modality} questions left for training, "
                        f"fewer than --batch-prompts {a.batch_prompts}")
    return Data(sorted(by_modality), sorted({e.qtype for e in examples}), a.train_modality, train,
                warm=train[:a.n_warm], test=[e for m in test for e in test[m]],
                curve=[e for m in test for e in test[m][:a.n_eval_curve]], cliff=train[:a.n_cliff],
                pool=[e for m in pool for e in pool[m]], fingerprint=fingerprint)


# ---- Infrastructure: folders, files, cached stages, checkpoints, torchrun ----------------------------------------
VARIANT_FLAGS = {"kdpo": ("tau",), "kepo": ("tau", "hint_mode")}  # the flags of a method beyond GRPO's
NOT_SHAPING = ("out", "resume", "compare", "report", "log_every", "ckpt_every", "device")  # flags a rerun may change
# Whole tensors, keyed by parameter name, on rank 0's CPU: the same file from 1 process or N, sharded or not
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
COLLECTIVE_MINUTES = 60  # ranks wait this long for each other at most (rank 0 writes files while the others wait)
COUNTS_PER_STEP = ("hint_groups", "hint_written", "hint_injected")  # summed over ranks; the rest are means


def tag(a: Args) -> str:
    """Names the run's folders: the preset, plus the data file and student checkpoint when given."""
    return "-".join([a.preset] + [Path(x.rstrip("/")).stem for x in (a.data, a.student) if x])


def seed_root(a: Args) -> str:
    return os.path.join(a.out, f"{tag(a)}-seed{a.seed}")


def stage_paths(a: Args) -> dict[str, str]:
    """The folders of the run's supervised stages: none with --student/--teacher, and no base with --data (JSONL
    data has no descriptions to pretrain on). Teacher and base are shared by seeds."""
    if a.student:
        return {}
    shared, warm = os.path.join(a.out, tag(a)), os.path.join(seed_root(a), "student_init")
    return {"teacher": f"{shared}-teacher"} | ({} if a.data else {"base": f"{shared}-base"}) | {"warm-up": warm}


def run_name(a: Args) -> str:
    """rl-{method}, plus each flag of the method that differs from its default (rl-kepo-tau2, rl-kepo-always)."""
    changed = [k for k in VARIANT_FLAGS.get(a.method, ()) if getattr(a, k) != getattr(Args, k)]
    return "-".join([f"rl-{a.method}"] + [f"tau{a.tau:g}" if k == "tau" else a.hint_mode for k in changed])


def as_json(obj):
    """obj as it reads back from JSON (tuples become lists), so that stored and live settings compare equal."""
    return json.loads(json.dumps(obj))


def read_json(path: str):
    return json.loads(Path(path).read_text())


def write_json(path: str, obj):
    Path(path).write_text(json.dumps(obj, indent=1))


def read_metrics(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged step ([] before the first)."""
    path = Path(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def save_atomically(path: str, write):
    """write(folder) into a temporary folder, then rename it to `path`: a killed save leaves no half folder."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_model(path: str, device, what: str, dtype=torch.float32):
    """from_pretrained(path) in `dtype` on `device`; a folder that does not load names itself and `what` it is.
    fp32 unless asked: transformers 5 keeps a checkpoint's own dtype, often bf16, where a small lr moves no weight."""
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    except Exception as e:
        raise UserError(f"{what} {path} cannot be loaded ({type(e).__name__}: {e}); delete it to rebuild it, "
                        "or check the path") from e


def require_single_process(what: str):
    """Under torchrun every stage before RL must be cached, so that one process trains them."""
    if kepo.world_size() > 1:
        raise UserError(f"{what} is missing; under torchrun every stage before RL must be cached: run the same "
                        "command once without torchrun (and --shard), with --steps 0")


def save_state(path: str, model, opt, **extra) -> float:
    """Weights, optimizer state and `extra` in one file, written under a temporary name and renamed (a kill
    leaves the previous file whole); returns the time it was written. Under torchrun every rank calls it
    (gathering a sharded model is a collective) and rank 0 writes."""
    weights, optimizer = get_state_dict(model, opt, options=WHOLE)
    if rank() == 0:
        torch.save({"model": weights, "optimizer": optimizer, **extra}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return time.time()


def load_state(path: str, model=None, opt=None, **expect) -> dict | None:
    """A save_state file, loaded into model and opt unless one of `expect` differs from it (then None)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it to start over") from e
    if any(state.get(k) != as_json(v) for k, v in expect.items()):
        return None
    if model is not None:  # every rank reads the whole file and keeps its shards
        set_model_state_dict(model, state["model"], options=WHOLE)
        # not strict: a weight no loss has reached (SigLIP's pooling head) has no optimizer state to restore
        set_optimizer_state_dict(model, opt, state["optimizer"], options=replace(WHOLE, strict=False))
    return state


def run_settings(a: Args, cfg: kepo.KEPOConfig) -> dict:
    """Every setting that shapes an RL run: what its checkpoint and results record, and what a rerun must match."""
    unused = tuple(k for k in VARIANT_FLAGS["kepo"] if k not in VARIANT_FLAGS.get(a.method, ()))
    flags = {k: v for k, v in asdict(a).items() if k not in NOT_SHAPING + unused}  # --compare --tau 2 is grpo's too
    config = {k: v for k, v in asdict(cfg).items() if k not in unused}
    return as_json(flags | {"kepo": config, "world_size": kepo.world_size()})


def differences(then: dict, now: dict) -> str:
    keys = sorted(set(then) | set(now), key=str)
    return ", ".join(f"{k} {then.get(k)!r} then, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k))


def finished_or_resumable(a: Args, cfg: kepo.KEPOConfig) -> dict | None:
    """The results of a finished run with these settings (reused), or None to train; refuses to mix settings
    and to overwrite an unfinished run (README, "Interrupted runs")."""
    folder, settings = os.path.join(seed_root(a), run_name(a)), run_settings(a, cfg)
    done, ckpt = os.path.join(folder, "results.json"), os.path.join(folder, "ckpt.pt")
    if os.path.exists(done):
        results = read_json(done)
        if results["settings"] != settings:
            raise UserError(f"{folder} finished with other settings ({differences(results['settings'], settings)}); "
                            "use another --out or delete the folder")
        return results
    if os.path.exists(ckpt):
        saved = load_state(ckpt)  # memory-mapped: only the step and the settings are read
        if not a.resume:
            raise UserError(f"{folder} holds an unfinished run (checkpoint at step {saved['step']}): add --resume "
                            "to continue it, or delete the folder to start over")
        if saved["settings"] != settings:
            raise UserError(f"--resume: the checkpoint in {folder} was made with other settings "
                            f"({differences(saved['settings'], settings)}); resume with the same flags")
    return None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def setup(a: Args) -> Args:
    """The device (auto: cuda if there is one); under torchrun, the process group (nccl on GPUs, gloo on CPU), one
    GPU per process, and rank 0 prints."""
    if a.device == "auto":
        a = replace(a, device="cuda" if torch.cuda.is_available() else "cpu")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {a.device}: torch {torch.__version__} sees no CUDA GPU here (try --device cpu)")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return a
    cuda = a.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=COLLECTIVE_MINUTES))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        a = replace(a, device=f"cuda:{os.environ['LOCAL_RANK']}")
    if rank():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints; held open for the life of the process
    return a


def shard(model, device):
    """FSDP2 over every rank, in place: each block transformers keeps whole (its _no_split_modules: decoder
    and vision encoder layers), then the root. `generate` is registered as a forward, so the root's own
    weights (embeddings, norms, the projector) are gathered for it as for a forward."""
    # FSDP2 warns at every forward that a module returned a view, in case the caller edits it in place; nothing
    # here does (sharded gradients equal one process's: test_two_ranks_give_one_process_loss_and_gradients...)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(torch.device(device).type, (kepo.world_size(),))
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    # the root frees its gathered weights after each forward too: FSDP's default keeps them for the backward,
    # which a frozen teacher or reference never runs, so they would stay gathered
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    register_fsdp_forward_method(model, "generate")
    return model


def home(a: Args) -> str:
    """Where whole models are loaded: the CPU under --shard (fully_shard moves each rank's shards to its GPU)."""
    return "cpu" if a.shard else a.device


def frozen(model, a: Args):
    """A model that only runs forwards (teacher, reference): in --dtype (bf16 halves it), no grads, --shard."""
    model = model.to(DTYPES[a.dtype]).requires_grad_(False)
    return shard(model, a.device) if a.shard else model


def gather(obj) -> list:
    """obj from every rank, in rank order ([obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_metrics(m: dict) -> dict:
    """The step's metrics over all ranks: counts summed, the rest averaged (every rank holds as many prompts)."""
    if not dist.is_initialized():
        return m
    gathered = gather(m)
    return {k: sum(g.get(k, 0.0) for g in gathered) / (1 if k in COUNTS_PER_STEP else len(gathered))
            for k in sorted(set().union(*gathered))}


# ---- One seed: the stages, then RL and evaluation for --method (or the four, --compare) --------------------------
# The start line's estimate: each stage's rate on the 2-core CPU box, cpu preset (README, "Stage times"); no GPU rate
CPU_STEPS_PER_SECOND = {"teacher": 4.8, "base": 15.2, "warm-up": 11.8}
CPU_RL_SECONDS_PER_PROMPT = 0.032


def main(a: Args):
    """Stages 1-3 (trained or cached), the premises, then stages 4-5 for each method; prints the table."""
    start, cfg = time.time(), kepo_config(a)
    runs = [replace(a, method=m) for m in (METHODS if a.compare else [a.method])] if a.steps else []
    done = {run_name(r): finished_or_resumable(r, cfg) for r in runs}  # before any work: never mixes settings
    print_start(a)
    s = stages(a, cfg)
    if not runs:
        print(f"--steps 0: stages and premises done; results in {seed_root(a)}/")
        return
    rows = dict(s.before["rows"])
    for r in runs:
        if done[run_name(r)]:
            print(f"{os.path.join(seed_root(r), run_name(r))} finished earlier with the same settings: "
                  "its results are reused")
        rows[run_name(r)] = done[run_name(r)] or run_method(r, cfg, s)
    if s.master:
        summarize_seed(a, s, rows, time.time() - start)


def stages(a: Args, cfg: kepo.KEPOConfig) -> Stages:
    """Stages 1-3 (trained, cached, or --student/--teacher) and the measurements before RL, printed."""
    data = jsonl_data(a) if a.data else toy_data(a)
    if a.student:
        proc, teacher, student = pretrained_stages(a)
    else:
        proc = build_processor(data.pool + data.test if a.data else [])
        teacher = teacher_stage(a, proc, data)
        student = student_stage(a, proc, data, base_stage(a, proc, data))
    before = before_rl(a, cfg, proc, teacher, student, data)
    teacher = frozen(teacher, a)
    print(f"learning cliff before RL ({data.train_modality} train, G={a.group_size}, all samples wrong): "
          + ", ".join(f"{q} {v:.2f}" for q, v in before["cliff"].items()))
    print("premises (before RL; a comparison of methods means something only where they hold, ✗ where one does not):")
    print("\n".join(premises_table({a.seed: before})))
    return Stages(proc, teacher, a.student or stage_paths(a)["warm-up"], data, before, master=rank() == 0)


def run_method(a: Args, cfg: kepo.KEPOConfig, s: Stages) -> dict:
    """Stages 4-5 (RL, evaluation) for one method; returns results.json, which rank 0 writes."""
    folder, settings = os.path.join(seed_root(a), run_name(a)), run_settings(a, cfg)
    os.makedirs(folder, exist_ok=True)
    print(f"stage 4: RL ({run_name(a)}) on {len(s.data.train)} {s.data.train_modality} questions, {a.steps} steps x "
          f"{a.batch_prompts} prompts x G={a.group_size}")
    start = time.time()
    student = rl(a, cfg, s, folder, settings)
    rl_time, start = time.time() - start, time.time()
    res = summarize(s.data.test, correctness(student, s.proc, s.data.test, cfg, a.device), s.data)
    still, was = cliff_mask(student, s.proc, s.data.cliff, cfg, a.device), s.before["cliff_mask"]
    res["cliff_solved"] = sum(w and not n for w, n in zip(was, still)) / max(sum(was), 1)
    metrics = read_metrics(folder)
    phases = {k: sum(m.get(k, 0.0) for m in metrics) for k in sorted(set().union(*metrics)) if k.startswith("time/")}
    res.update(method=a.method, run=run_name(a), seed=a.seed, preset=a.preset, settings=settings, rl_seconds=rl_time,
               eval_seconds=time.time() - start, phases=phases, kepo_config=asdict(cfg))
    if s.master:
        write_json(os.path.join(folder, "results.json"), res)
        Path(folder, "ckpt.pt").unlink(missing_ok=True)  # finished: student/ holds the result
    return res


def summarize_seed(a: Args, s: Stages, rows: dict, seconds: float):
    """The accuracy table with chance, the stage times (and data share), and summary.json."""
    print(f"\ngreedy accuracy on {len(s.data.test)} held-out questions (* = in-distribution; chance from each "
          "question's options):")
    cols = s.data.modalities + ["ID", "OOD"] + [f"q/{q}" for q in s.data.qtypes]
    print("\n".join(md_table([""] + [c + "*" if c == s.data.train_modality else c.removeprefix("q/") for c in cols],
                              [[name] + [res[c] for c in cols] for name, res in rows.items()])))
    stages = {name: read_json(os.path.join(path, "stage.json"))["times"] for name, path in stage_paths(a).items()}
    stages["before_rl"] = {"seconds": round(s.before["seconds"], 1)}
    write_json(os.path.join(seed_root(a), "summary.json"), {
        "cliff_before_rl": s.before["cliff"], "premises": s.before["premises"], "rows": rows, "stages": stages,
        "seconds": seconds})
    times = [f"{n} {t['seconds']:.0f}s" + (f" (data {t['data_share']:.1%})" if "data_share" in t else "")
             for n, t in stages.items()]
    print("stage times (as each was trained; cached stages are reused): " + ", ".join(times))
    print(f"\nresults in {seed_root(a)}/ ({seconds:.0f}s)")


def print_start(a: Args):
    """One line: device, preset, which stages are cached, and (on CPU) an estimate of the time."""
    cuda = a.device.startswith("cuda")
    device = torch.cuda.get_device_name(a.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    todo = [n for n, p in stage_paths(a).items() if not os.path.exists(os.path.join(p, "stage.json"))]
    steps = {"teacher": a.teacher_steps, "base": a.base_steps, "warm-up": a.warm_steps}
    seconds = sum(steps[n] / CPU_STEPS_PER_SECOND[n] for n in todo)
    seconds += a.steps * a.batch_prompts * CPU_RL_SECONDS_PER_PROMPT * (len(METHODS) if a.compare else 1)
    pace = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    estimate = "progress lines give the pace" if cuda else f"about {pace} on a 2-core CPU"
    cached = ", ".join(f"{n} {'to train' if n in todo else 'cached'}" for n in stage_paths(a)) or \
        "--student/--teacher checkpoints"
    print(f"train_small.py: {'compare' if a.compare else a.method}, preset {a.preset}, seed {a.seed}, on {device} | "
          f"stages: {cached} | {estimate}")


# ---- Report over seeds (--report, not part of KEPO): the README's tables, mean ± std, paired differences ---------
# Rows in this order; the runs are what the README's loop over seeds and variants leaves under --out
REPORT_ORDER = ["chance", "teacher", "student (before RL)", "rl-grpo", "rl-opd", "rl-kdpo", "rl-kepo", "rl-kepo-tau0",
                "rl-kepo-tau2", "rl-kepo-always"]
HINT_METRICS = ("hint_groups", "hint_accept_rate", "hint_injected")  # per-step means over a run's metrics.jsonl
HINT_TABLE = dict(zip(HINT_METRICS + ("cliff_solved", "rl_seconds"), (
    "triggered groups / step", "groups with an accepted hint", "injected / step", "cliff prompts solved after RL",
    "RL seconds")))


def collect(a: Args) -> tuple[dict[str, dict[int, dict]], dict[int, dict]]:
    """(row name -> seed -> results, in REPORT_ORDER; seed -> before-RL record) for every seed under --out."""
    found, befores = {}, {}
    for path in sorted(Path(a.out).glob(f"{tag(a)}-seed*/before_rl.json")):
        befores[seed := int(path.parent.name.rsplit("-seed", 1)[1])] = read_json(path)
        for name, row in befores[seed]["rows"].items():
            found.setdefault(name, {})[seed] = row
        for run_dir in sorted(path.parent.glob("rl-*")):
            if (run_dir / "results.json").exists():
                res, metrics = read_json(run_dir / "results.json"), read_metrics(run_dir)
                res |= {k: sum(m.get(k, 0.0) for m in metrics) / len(metrics) for k in HINT_METRICS}
                found.setdefault(res["run"], {})[seed] = res
    rank_of = lambda name: REPORT_ORDER.index(name) if name in REPORT_ORDER else len(REPORT_ORDER)  # noqa: E731
    return dict(sorted(found.items(), key=lambda kv: rank_of(kv[0]))), befores


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def over_seeds(found: dict[str, dict[int, dict]], head: list[str], keys: list[str]) -> list[str]:
    """One row per run: its number of seeds, then each key's mean ± std over them."""
    return md_table(["run", "seeds", *head], [[n, str(len(rs)), *(mean_std(r[k] for r in rs.values()) for k in keys)]
                                              for n, rs in found.items()]) + [""]


def paired_table(found: dict[str, dict[int, dict]]) -> list[str]:
    """KEPO minus each baseline, seed by seed (the same warm student and test questions): mean ± std, wins."""
    rows = []
    for other in ("rl-grpo", "rl-opd", "rl-kdpo"):
        seeds = sorted(set(found.get("rl-kepo", {})) & set(found.get(other, {})))
        if seeds:
            diffs = [[found["rl-kepo"][s][col] - found[other][s][col] for s in seeds] for col in ("OOD", "ID")]
            wins = [f"{sum(d > 0 for d in col)}/{len(col)}" for col in diffs]
            rows.append([f"kepo - {other[3:]}", mean_std(diffs[0]), wins[0], mean_std(diffs[1]), wins[1]])
    return md_table(["paired difference", "OOD", "seeds > 0", "ID", "seeds > 0"], rows) + [""]


def report(a: Args):
    """Premises, accuracy per modality and per question type, paired differences, hints: printed and written
    to {out}/{tag}-report.md."""
    found, befores = collect(a)
    if not befores:
        raise UserError(f"--report: no results under {a.out} for {tag(a)}")
    columns, train = list(found["chance"].values())[0], list(befores.values())[0]["key"]["train_modality"]
    qtypes = [c for c in columns if c.startswith("q/")]
    modalities = [c for c in columns if c not in qtypes and c not in ("ID", "OOD")] + ["ID", "OOD"]
    lines = premises_table(befores) + over_seeds(found, [m + " (ID)" * (m == train) for m in modalities], modalities)
    lines += over_seeds(found, [q[2:] for q in qtypes], qtypes) + paired_table(found)
    lines += over_seeds({n: rs for n, rs in found.items() if n.startswith("rl-")}, list(HINT_TABLE.values()),
                        list(HINT_TABLE))
    Path(a.out, f"{tag(a)}-report.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ---- Command line: one line for a user error (exit 2) or an interruption (exit 130), never a traceback -----------
def cli(a: Args):
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a redirected log as it is printed
    hf_logging.disable_progress_bar()
    try:
        a = setup(a)
        report(a) if a.report else main(a)
    except UserError as e:
        print(f"train_small.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: kept under {a.out}/ are the finished stages, a supervised stage's state (saved every "
              f"{SFT_SAVE_SECONDS} s) and RL checkpoints (every --ckpt-every steps); rerun the same command to "
              "continue (with --resume for RL)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(ARGS)
