"""KEPO end to end on a toy medical VQA: data, teacher, student, RL, evaluation.

    python train_small.py                     # KEPO, default preset (one GPU)
    python train_small.py --preset smoke      # the whole pipeline on CPU in well under a minute
    python train_small.py --compare           # grpo, opd, kdpo, kepo from the same student and seed
    python train_small.py --grid --seeds 1,2,3,4,5   # every method and ablation per seed, then a report
    python train_small.py --data omni.jsonl --student ckpt/student --teacher ckpt/teacher   # beyond the toy
    torchrun --nproc_per_node 4 train_small.py ...                  # one process per GPU (DDP)

A miniature of the paper's protocol, nothing downloaded:
  data     procedurally drawn 48x48 images in 8 synthetic "modalities" that share anatomy and
           findings but differ in look; OmniMedVQA-style multiple-choice questions of the 5
           types (modality, anatomy, diagnosis, lesion grading, other attributes: side or
           count) with shuffled options, listed as `options ct a , mri b , ...`; answers
           `<think> modality mri b </think> <answer> b </answer>`: the evidence, the letter it
           points to, the answer. (Listing the letter after the option text makes the lookup an
           induction copy that a 2-layer model learns; letter-first listing was not learned.)
           Images are drawn once into a bank under --out and kept as pixel tensors.
  models   two LLaVA-style VLMs (SigLIP vision tower, 16 patches of 12x12, + Qwen2 text model)
           from configs with random init; the teacher is several times larger. A word-level
           tokenizer and a LlavaProcessor are built in code and saved, so everything reloads
           with `from_pretrained`.
  stages   (each cached under --out and reused)
           1. teacher SFT on every modality, also writing a hint from the answer (once per preset);
           2. base student: pretrained to describe images of every modality in words, the
              stand-in for a pretrained VLM (once per preset; skipped for --data);
           3. student warm-up SFT on a small train-modality set, also on hinted prompts so it
              can use a hint (per seed), then the premises table (teacher strength, transfer,
              room to learn, the learning cliff, chance);
           4. RL on train-modality questions only with --method;
           5. greedy evaluation on held-out questions of all 8 modalities, chance beside it.
Simplified on purpose: tiny models and a toy task, so that a run takes minutes; the RL
step itself is kepo.kepo_step, unchanged from what a real trainer would call.
Beyond the toy: --data reads OmniMedVQA-style JSONL (checked before anything trains),
--student/--teacher replace stages 1-3 by local checkpoints of any family the Auto classes
load, and torchrun shards each step's prompts over processes that hold a DDP student.
"""
import argparse
import datetime
import glob
import hashlib
import json
import math
import os
import random
import shutil
import string
import subprocess
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

# transformers warns at import about optional backends (torchvision) that the toy does not need
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast, Qwen2Config, SiglipImageProcessor,
                          SiglipVisionConfig)
from transformers.utils import logging as hf_logging

import kepo


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    preset: str = arg("default", "default (one GPU) | cpu (reduced, for CPU-only evidence) | smoke (CI, < 1 min)")
    method: str = arg("kepo", "grpo | opd | kdpo | kepo")
    seed: int = arg(1, "fixes data, initialisation and sampling (bit-exact on CPU)")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    out: str = arg("runs", "cache and output folder")
    compare: bool = arg(False, "run grpo, opd, kdpo and kepo from the same student and print one table")
    resume: bool = arg(False, "continue RL from its last checkpoint (or reuse a finished run's results)")
    steps: int = arg(0, "RL steps (0: the preset's)")
    batch_prompts: int = arg(0, "prompts per RL step (0: the preset's)")
    group_size: int = arg(8, "G, completions per prompt")
    lr: float = arg(0.0, "RL learning rate, the same for every method (0: the preset's)")
    tau: float = arg(1.0, "quality gate r >= tau (r = accuracy + format in {0, 1, 2})")
    hint_mode: str = arg("adaptive", "adaptive: hints for groups with no correct rollout; always: every group")
    ckpt_every: int = arg(0, "RL checkpoint interval in steps (0: the preset's)")
    log_every: int = arg(0, "progress line interval in steps (0: the preset's)")
    grid: bool = arg(False, "every method and ablation for each of --seeds (finished runs are reused), then --report")
    seeds: str = arg("1,2,3,4,5", "seeds of --grid, comma-separated")
    jobs: int = arg(1, "RL runs in parallel processes (a GPU box with many cores); 1 runs them in turn")
    report: bool = arg(False, "aggregate the results under --out: mean ± std tables and curves (needs matplotlib)")
    student: str = arg("", "local HF VLM checkpoint (model + processor) to train instead of the toy student")
    teacher: str = arg("", "local HF VLM checkpoint of the teacher, same tokenizer as --student (pass both)")
    data: str = arg("", "OmniMedVQA-style JSONL: image, question, options, answer, modality, qtype (default: toy)")
    train_modality: str = arg("mri", "the modality RL trains on; evaluation covers every modality")
    max_new_tokens: int = arg(12, "cap on completion and hint tokens (the toy's longest answer is 9)")
    micro_batch: int = arg(0, "rows per forward and backward of an RL step, gradients accumulated exactly (0: all)")
    dtype: str = arg("fp32", "fp32 | bf16: teacher and reference in bf16, the student's RL step under bf16 autocast "
                             "(its weights and optimizer stay fp32)")


PRESETS = {  # sizes and budgets, the same for every method. cpu = default with 16 RL prompts a step, not 64, a
    # smaller OOD-curve subset and rarer checkpoints and log lines; smoke = tiny, for CI
    "default": dict(teacher_steps=4500, base_steps=1000, warm_steps=800, steps=200, batch_prompts=64, lr=3e-4,
                    teacher_lr=1e-3, sft_lr=1e-3, sft_batch=64, n_pool=1500, n_train=600, n_warm=1000, n_test=200,
                    n_cliff=192, eval_every=25, n_eval_curve=24, ckpt_every=25, log_every=10, student=(48, 2),
                    teacher=(128, 2)),
    "cpu": dict(teacher_steps=4500, base_steps=1000, warm_steps=800, steps=200, batch_prompts=16, lr=3e-4,
                teacher_lr=1e-3, sft_lr=1e-3, sft_batch=64, n_pool=1500, n_train=600, n_warm=1000, n_test=200,
                n_cliff=192, eval_every=25, n_eval_curve=12, ckpt_every=50, log_every=25, student=(48, 2),
                teacher=(128, 2)),
    "smoke": dict(teacher_steps=8, base_steps=4, warm_steps=4, steps=6, batch_prompts=4, lr=3e-4, teacher_lr=1e-3,
                  sft_lr=1e-3, sft_batch=16, n_pool=8, n_train=16, n_warm=16, n_test=4, n_cliff=8, eval_every=3,
                  n_eval_curve=2, ckpt_every=2, log_every=2, student=(32, 1), teacher=(48, 1)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype
PRETRAIN_SEED = 0  # teacher and base student stand for released checkpoints: trained once per preset, shared by seeds
EVAL_BATCH = 256  # rows per generate call in evaluation
# The toy's premises, checked before RL (README, "The toy's premises"); calibrated on these alone, never on RL outcomes
TEACHER_MIN_QTYPE = 0.90  # teacher accuracy on every question type, all modalities pooled
TEACHER_MIN_MODALITY = 0.85  # teacher accuracy on every modality
ROOM = 0.15  # warm student: OOD >= chance + ROOM (transfer exists), ID and OOD <= teacher - ROOM (room to distil)
CLIFF_MIN = 0.15  # share of train prompts whose G samples are all wrong before RL
BASE_MIN = 0.85  # base student: names the organ right, on every modality


# ---------------------------------------------------------------------------------------
# Toy medical VQA: cases, images, questions
# ---------------------------------------------------------------------------------------
MODALITIES = ["ct", "dermoscopy", "fundus", "mri", "microscopy", "oct", "ultrasound", "xray"]
ORGANS = ["brain", "lung", "liver", "heart"]
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
    image: str = ""  # image file (JSONL data); empty for toy cases, which are drawn
    modality: str = ""
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [3, H, W] uint8, from the bank

    def __post_init__(self):
        if self.case is not None:
            object.__setattr__(self, "modality", self.case.modality)

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


def draw_organ(d: ImageDraw.ImageDraw, organ: str, color: tuple):
    if organ == "brain":
        d.ellipse((7, 6, 41, 42), fill=color)
    elif organ == "lung":
        d.ellipse((5, 6, 23, 43), fill=color)
        d.ellipse((25, 6, 43, 43), fill=color)
    elif organ == "liver":
        d.polygon([(4, 7), (44, 7), (37, 42), (11, 42)], fill=color)
    else:
        d.polygon([(24, 3), (45, 24), (24, 45), (3, 24)], fill=color)


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
    draw_organ(d, case.organ, organ_color)
    for slot in case.slots:
        draw_lesion(d, case.finding, slot, GRADES[case.grade], lesion_color)
    img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    noise = Image.frombytes("L", img.size, rng.randbytes(IMAGE_SIZE * IMAGE_SIZE)).convert("RGB")
    return Image.blend(img, noise, NOISE_WEIGHT["fan" if style == "fan" else "other"])


def side(case: Case) -> str:
    return "left" if case.slots[0][0] < IMAGE_SIZE // 2 else "right"


def make_case(rng: random.Random, modality: str, qtype: str, attribute: str | None) -> Case:
    """A case that can answer `qtype`: grading and attribute need a lesion, "side" exactly one."""
    finding = rng.choice(FINDINGS[1:] if qtype in ("grading", "attribute") else FINDINGS)
    n = 0 if finding == "normal" else 1 if attribute == "side" else rng.randint(1, len(SLOTS) - 1)
    return Case(modality, rng.choice(ORGANS), finding, rng.choice(list(GRADES)) if n else None,
                tuple(rng.sample(SLOTS, n)), rng.randrange(2**31))


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
    return Example(case, qtype, question, tuple(choices), LETTERS[choices.index(truth)], f"{key} {truth}")


def make_example(rng: random.Random, modality: str) -> Example:
    """One question, its type drawn uniformly from the five, and a new case that it fits."""
    qtype = rng.choice(list(QUESTIONS))
    attribute = rng.choice(list(ATTRIBUTE_QUESTIONS)) if qtype == "attribute" else None
    return ask(rng, make_case(rng, modality, qtype, attribute), qtype, attribute)


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
    """A fixed split: the same (seed, name, modality) always gives the same questions."""
    rng = random.Random(f"{seed}-{name}-{modality}")
    return [make_example(rng, modality) for _ in range(n)]


def with_pixels(examples: list[Example], path: str) -> list[Example]:
    """The examples with their images as uint8 tensors, drawn once and cached in `path` (a bank file).

    Drawing and preprocessing every batch would bound the supervised stages on CPU; the bank
    is checked against the cases' seeds, so a stale file is redrawn, never misused.
    """
    seeds = [e.case.seed for e in examples]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bank = torch.load(path, weights_only=True) if os.path.exists(path) else None
    if bank is None or bank["seeds"].tolist() != seeds:
        pixels = torch.stack([torch.frombuffer(bytearray(draw(e.case).tobytes()), dtype=torch.uint8)
                              .view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1) for e in examples])
        bank = {"seeds": torch.tensor(seeds), "pixels": pixels}
        torch.save(bank, path + ".tmp")
        os.replace(path + ".tmp", path)
    return [replace(e, pixels=p) for e, p in zip(examples, bank["pixels"])]


def image_of(ex: Example) -> Image.Image:
    if not ex.image:
        return draw(ex.case)
    try:
        return Image.open(ex.image).convert("RGB")
    except Exception as e:  # e.g. truncated data behind a valid header
        raise ValueError(f"image {ex.image} cannot be decoded ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------
# Real data instead of the toy (--data): OmniMedVQA-style JSONL, checked before training
# ---------------------------------------------------------------------------------------
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
    return Example(None, rec["qtype"], rec["question"], tuple(options), answer, truth, image=path,
                   modality=rec["modality"])


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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    examples, numbers = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(parse_record(line, os.path.dirname(os.path.abspath(path))))
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            numbers.append(number)
    if not examples:
        raise ValueError(f"{path}: no records")
    with ThreadPoolExecutor() as pool:  # PIL decodes outside the GIL: threads use every core
        errors = list(pool.map(image_error, [e.image for e in examples]))
    for number, e, error in zip(numbers, examples, errors):
        if error:
            raise ValueError(f"{path}:{number}: image {e.image} cannot be read ({error})")
    return examples


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


def toy_data(a: Args, p: dict) -> Data:
    """Fixed toy splits for a.seed, with their images from the bank; the pool (for the teacher and base stages)
    is the preset's, shared by seeds."""
    if a.train_modality not in MODALITIES:
        raise ValueError(f"--train-modality {a.train_modality}: the toy has {MODALITIES}")
    root = seed_root(a)
    os.makedirs(root, exist_ok=True)

    def split(name: str, modalities: list[str], n: int, seed: int = a.seed, folder: str = root) -> list[Example]:
        exs = [e for m in modalities for e in make_split(seed, name, m, n)]
        # the bank holds pixels as the toy's processor makes them; a checkpoint's own processor draws per batch
        return exs if a.student else with_pixels(exs, os.path.join(folder, f"bank-{name}.pt"))
    train = split("train", [a.train_modality], p["n_train"])
    pool = [] if a.student else split("pool", MODALITIES, p["n_pool"], PRETRAIN_SEED,
                                      os.path.join(a.out, f"{tag(a)}-bank"))
    return Data(MODALITIES, list(QUESTIONS), a.train_modality, train,
                warm=split("warm", [a.train_modality], p["n_warm"]), test=split("test", MODALITIES, p["n_test"]),
                curve=split("curve", MODALITIES, p["n_eval_curve"]), cliff=train[:p["n_cliff"]], pool=pool,
                fingerprint="toy")


def jsonl_data(a: Args, p: dict) -> Data:
    """Per modality, a shuffle keyed by the file holds out min(n_test, 20%) questions for evaluation; the rest trains.

    The split depends on the file alone, not on --seed: the teacher, trained once per file on
    the rest, never sees a question of any seed's test set.
    """
    examples = load_jsonl(a.data)
    with open(a.data, "rb") as f:
        fingerprint = hashlib.sha1(f.read()).hexdigest()[:12]
    by_modality = {}
    for e in examples:
        by_modality.setdefault(e.modality, []).append(e)
    if a.train_modality not in by_modality:
        raise ValueError(f"--train-modality {a.train_modality} is not in {a.data} (it has {sorted(by_modality)})")
    test, pool = {}, {}
    for m, exs in sorted(by_modality.items()):
        exs = random.Random(f"{fingerprint}-split-{m}").sample(exs, len(exs))
        n = max(1, min(p["n_test"], len(exs) // 5))
        test[m], pool[m] = exs[:n], exs[n:]
    train = pool[a.train_modality]
    if len(train) < p["batch_prompts"]:
        raise ValueError(f"{a.data}: {len(train)} {a.train_modality} questions left for training, "
                         f"fewer than --batch-prompts {p['batch_prompts']}")
    return Data(sorted(by_modality), sorted({e.qtype for e in examples}), a.train_modality, train,
                warm=train[:p["n_warm"]], test=[e for m in test for e in test[m]],
                curve=[e for m in test for e in test[m][:p["n_eval_curve"]]], cliff=train[:p["n_cliff"]],
                pool=[e for m in pool for e in pool[m]], fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------
# Prompts and targets (plain, hint request for the teacher, hinted prompt for the student)
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# Tokenizer, processor and models, built from code (no download)
# ---------------------------------------------------------------------------------------
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
DESCRIBE_PROMPT = "describe the image"  # the base student's pretraining task
DESCRIBE_TOKENS = 16  # the longest description is 13 words plus EOS
HINT_SHARE = 0.25  # of the teacher's SFT prompts ask for a hint given the answer; the rest ask the question
HINTED_SHARE = 0.3  # of the warm-up prompts carry the correct hint, so the student can use one in RL
REPLAY_SHARE = 0.5  # of each warm-up batch replays the base's describe task on every modality
MAX_GRAD_NORM = 1.0  # gradient clipping of the supervised stages
PROGRESS_SECONDS = 10  # a progress line at least this often


def build_processor(extra: list[Example] = ()) -> LlavaProcessor:
    """A LlavaProcessor: a word-level tokenizer over the toy's words (and `extra`'s) and a SigLIP image processor."""
    words = set(LETTERS) | set(MODALITIES + ORGANS + FINDINGS + list(GRADES) + COUNTS)
    words |= {",", "left", "right", "options", "answer", "hint", "modality", "organ", "finding", "size", "count",
              "side"}
    words |= set(DESCRIBE_PROMPT.split())
    for q in [*filter(None, QUESTIONS.values()), *ATTRIBUTE_QUESTIONS.values()]:
        words |= set(q.split())
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    for e in extra:
        words |= {w.lower() for w, _ in split.pre_tokenize_str(f"{prompt_text(e)} {e.answer}")}
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<image>"] + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left")
    tok.add_tokens(TAGS)
    images = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[PIXEL_MEAN] * 3,
                                  image_std=[PIXEL_STD] * 3)
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, image_token="<image>",
                          vision_feature_select_strategy="full", num_additional_image_tokens=0)


def build_vlm(tok, hidden: int, layers: int) -> LlavaForConditionalGeneration:
    """A LLaVA: SigLIP vision tower (IMAGE_TOKENS patches of PATCH x PATCH) + Qwen2 text model, random init."""
    vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(config)


def user_turn(proc, text: str) -> str:
    """The image and `text` as the model expects them: its chat template, else `<image> text`."""
    if chat(proc):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return proc.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return f"{proc.image_token} {text}"


TOKEN_IDS = weakref.WeakKeyDictionary()  # tokenizer -> {text: ids}


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

    Bank images (the toy) skip the image processor: their text is expanded to IMAGE_TOKENS
    image tokens as LlavaProcessor does, and their pixels are normalised as SiglipImageProcessor
    does (a test checks both against the processor), which keeps data preparation cheap.
    """
    full = [user_turn(proc, t) + (f" {targets[i]}" if targets else "") for i, t in enumerate(texts)]
    if all(e.pixels is not None for e in examples):
        ids = token_ids(proc.tokenizer, [t.replace(proc.image_token, proc.image_token * IMAGE_TOKENS) for t in full])
        width = max(map(len, ids))  # left padding, as the toy's tokenizer pads
        enc = {"input_ids": torch.tensor([[proc.tokenizer.pad_token_id] * (width - len(i)) + i for i in ids]),
               "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
               "pixel_values": (torch.stack([e.pixels for e in examples]).float() * (1 / 255) - PIXEL_MEAN) / PIXEL_STD}
    else:
        enc = proc(text=full, images=[image_of(e) for e in examples], return_tensors="pt", padding=True)
    vision = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return kepo.PromptBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device), vision)


# ---------------------------------------------------------------------------------------
# Stages 1-3: supervised fine-tuning of the teacher, the base student and its warm-up
# ---------------------------------------------------------------------------------------
def sft(model, proc, draw_batch, steps: int, batch_size: int, lr: float, device, name: str, seed: int) -> dict:
    """AdamW on batches (examples, prompts, targets) = draw_batch(rng, batch_size), cross-entropy on targets only.

    Returns the wall time and the share of it spent preparing batches (drawing, tokenizing, moving).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, start, data_time, shown = random.Random(f"sft-{name}-{seed}"), time.time(), 0.0, time.time()
    for step in range(1, steps + 1):
        t = time.perf_counter()
        examples, prompts, targets = draw_batch(rng, batch_size)
        batch = encode(proc, examples, prompts, device, targets)
        labels = batch.input_ids.clone()  # prompt and padding are labelled -100: only targets are learned
        for i, n in enumerate(len(ids) for ids in token_ids(proc.tokenizer, targets)):
            labels[i, :labels.shape[1] - n] = -100
        data_time += time.perf_counter() - t
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision,
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        if time.time() - shown > PROGRESS_SECONDS or step == steps:
            shown, rate = time.time(), step / (time.time() - start)
            print(f"  [{name}] step {step}/{steps} loss {loss.item():.3f} | {rate:.1f} steps/s "
                  f"ETA {(steps - step) / rate:.0f}s", flush=True)
    seconds = time.time() - start
    return {"seconds": round(seconds, 1), "data_share": round(data_time / seconds, 4)}


def teacher_batch(pool: list[Example]):
    """Teacher data, every modality: fresh questions about bank images (or the JSONL pool's); some write a hint."""
    def draw_batch(rng, n):
        exs = [rng.choice(pool) for _ in range(n)]
        exs = [any_question(rng, e) if e.case else e for e in exs]
        hint = [rng.random() < HINT_SHARE for _ in exs]
        return (exs, [hint_request_text(e) if h else prompt_text(e) for e, h in zip(exs, hint)],
                [hint_text(e) if h else answer_text(e) for e, h in zip(exs, hint)])
    return draw_batch


def describe_batch(pool: list[Example]):
    """Base-student data, every modality: describe the image in words (no question, no options)."""
    def draw_batch(rng, n):
        exs = [rng.choice(pool) for _ in range(n)]
        return exs, [DESCRIBE_PROMPT] * n, [describe_text(e.case) for e in exs]
    return draw_batch


def warmup_batch(warm_set: list[Example], pool: list[Example]):
    """Student warm-up: train-modality questions, some with the (correct) hint so that hints are usable, mixed
    with the base's describe task on every modality (replay, when there is a base) so perception is not forgotten."""
    describe = describe_batch(pool)

    def draw_batch(rng, n):
        n_replay = int(n * REPLAY_SHARE) if pool else 0
        exs = [rng.choice(warm_set) for _ in range(n - n_replay)]
        prompts = [hinted_text(e, e.evidence) if rng.random() < HINTED_SHARE else prompt_text(e) for e in exs]
        replay = describe(rng, n_replay)
        return exs + replay[0], prompts + replay[1], [answer_text(e) for e in exs] + replay[2]
    return draw_batch


# ---------------------------------------------------------------------------------------
# Evaluation: greedy accuracy, chance, the learning cliff and the premises before RL (stages 3 and 5)
# ---------------------------------------------------------------------------------------
def kepo_config(a: Args) -> kepo.KEPOConfig:
    """The one KEPOConfig of a run: the flags that set it, the authors' defaults for the rest."""
    return kepo.KEPOConfig(group_size=a.group_size, max_new_tokens=a.max_new_tokens, max_hint_tokens=a.max_new_tokens,
                           tau=a.tau, hint_mode=a.hint_mode, micro_batch_size=a.micro_batch or None)


@torch.no_grad()
def completions(model, proc, examples: list[Example], texts: list[str], a: Args, group_size=1, temperature=0.0,
                max_new_tokens=0) -> list[str]:
    """len(examples) * group_size completions of the prompts `texts`, in batches of about EVAL_BATCH rows."""
    cfg, out = kepo_config(a), []
    step = max(EVAL_BATCH // group_size, 1)
    for i in range(0, len(examples), step):
        batch = encode(proc, examples[i:i + step], texts[i:i + step], a.device)
        out += kepo.generate_rollouts(model, proc.tokenizer, batch, group_size, temperature=temperature,
                                      top_p=cfg.top_p, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                                      suppress=kepo.suppressed_ids(proc.tokenizer, model)).texts
    return out


def correctness(model, proc, examples: list[Example], a: Args, group_size=1, temperature=0.0) -> torch.Tensor:
    """[len(examples) * group_size] 1.0 where the completion's answer letter is right (greedy by default)."""
    texts = completions(model, proc, examples, [prompt_text(e, chat(proc)) for e in examples], a, group_size,
                        temperature)
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


def describe_accuracy(model, proc, data: Data, a: Args) -> dict:
    """Per modality: the share of test images whose greedy description names the right organ (the base premise)."""
    texts = completions(model, proc, data.test, [DESCRIBE_PROMPT] * len(data.test), a, max_new_tokens=DESCRIBE_TOKENS)
    hits = torch.tensor([float(f"organ {e.case.organ}" in t) for e, t in zip(data.test, texts)])
    return {m: v for m, v in summarize(data.test, hits, data).items() if m in data.modalities}


def cliff_mask(model, proc, examples: list[Example], a: Args) -> list[bool]:
    """Per prompt: are all G samples (sampled as in RL) wrong? The learning cliff."""
    cfg = kepo_config(a)
    correct = correctness(model, proc, examples, a, cfg.group_size, cfg.temperature)
    return (correct.view(-1, cfg.group_size).amax(1) == 0).tolist()


def cliff_by_type(examples: list[Example], mask: list[bool], data: Data) -> dict:
    out = {q: sum(w for e, w in zip(examples, mask) if e.qtype == q) / max(sum(e.qtype == q for e in examples), 1)
           for q in data.qtypes}
    out["all"] = sum(mask) / len(mask)
    return out


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


def print_premises(items: list[dict]):
    print("premises (before RL; a comparison of methods means something only where they hold):")
    for it in items:
        target = " and ".join(f"{op} {x:.3f}" for op, x in ((">=", it["min"]), ("<=", it["max"])) if x is not None)
        print(f"  {it['premise']:<62} {it['value']:.3f}  target {target:<22} {'holds' if it['holds'] else 'FAILS'}")


# ---------------------------------------------------------------------------------------
# Cached stages: a stage folder is used only if its marker says it finished with this config
# ---------------------------------------------------------------------------------------
def as_json(obj):
    """obj as it reads back from JSON (tuples become lists), so that stored and live settings compare equal."""
    return json.loads(json.dumps(obj))


def marker(path: str) -> dict:
    """A finished stage's stage.json: the config it was built with and its times."""
    with open(os.path.join(path, "stage.json")) as f:
        return json.load(f)


def load_stage(path: str, config: dict):
    """The model saved in `path`, or None if the stage never finished; errors name the folder."""
    if not os.path.exists(os.path.join(path, "stage.json")):
        return None
    try:
        saved = marker(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
    except Exception as e:
        raise RuntimeError(f"cached stage {path} is corrupt ({type(e).__name__}: {e}); delete it to rebuild") from e
    if saved["config"] != as_json(config):
        raise RuntimeError(f"cached stage {path} was built with {saved['config']}, not {config}; "
                           "use another --out or delete it")
    return model


def save_stage(path: str, model, proc, config: dict, times: dict):
    """save_pretrained into a temporary folder, then rename: a killed save leaves no half stage."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    with open(os.path.join(tmp, "stage.json"), "w") as f:
        json.dump({"config": config, "times": times}, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def seed_root(a: Args) -> str:
    return os.path.join(a.out, f"{tag(a)}-seed{a.seed}")


def tag(a: Args) -> str:
    """Names the run's folders: the preset, plus the data file and student checkpoint when given."""
    parts = [a.preset] + [os.path.splitext(os.path.basename(x.rstrip("/")))[0] for x in (a.data, a.student) if x]
    return "-".join(parts)


def sft_stage(a: Args, path: str, config: dict, proc, init, draw_batch, seed: int, title: str):
    """A cached supervised stage: the model in `path` if it finished with `config`, else init() trained and saved."""
    cached = load_stage(path, config)
    if cached is not None:
        return cached.to(a.device)
    print(f"{title} ({config['steps']} steps x {config['batch']})", flush=True)
    torch.manual_seed(seed)
    model = init().to(a.device)
    times = sft(model, proc, draw_batch, config["steps"], config["batch"], config["lr"], a.device,
                os.path.basename(path), seed)
    save_stage(path, model, proc, config, times)
    return model


def stage_config(p: dict, data: Data, size: str, steps: str, lr: str) -> dict:
    return {"size": p[size], "steps": p[steps], "batch": p["sft_batch"], "lr": p[lr], "data": data.fingerprint,
            "pool": len(data.pool), "image": [IMAGE_SIZE, PATCH]}


def teacher_stage(a: Args, p: dict, proc, data: Data):
    """Stage 1: the teacher, a stand-in for a large VLM that knows the task on every modality."""
    return sft_stage(a, os.path.join(a.out, f"{tag(a)}-teacher"), stage_config(p, data, "teacher", "teacher_steps",
                                                                                "teacher_lr"),
                     proc, lambda: build_vlm(proc.tokenizer, *p["teacher"]), teacher_batch(data.pool), PRETRAIN_SEED,
                     "stage 1: teacher SFT on every modality, also writing hints (shared by every seed)")


def base_stage(a: Args, p: dict, proc, data: Data) -> str:
    """Stage 2: the base student, a stand-in for a pretrained VLM: it describes images of every modality.

    Returns its folder (warm-up starts from it). JSONL data has no descriptions: then there is none ("").
    """
    if a.data:
        return ""
    path = os.path.join(a.out, f"{tag(a)}-base")
    sft_stage(a, path, stage_config(p, data, "student", "base_steps", "sft_lr"), proc,
              lambda: build_vlm(proc.tokenizer, *p["student"]), describe_batch(data.pool), PRETRAIN_SEED,
              "stage 2: base student pretraining, describing images of every modality (shared by every seed)")
    return path


def student_stage(a: Args, p: dict, proc, data: Data, base: str):
    """Stage 3: warm-up SFT of the base student on train-modality questions (per seed).

    The base's vision tower is frozen: warm-up teaches the answer format and the option lookup
    without retuning perception to the train modality alone, and half of every batch replays
    the base's describe task on every modality, so that what the base perceives is not forgotten.
    """
    config = stage_config(p, data, "student", "warm_steps", "sft_lr") | {
        "n_warm": p["n_warm"], "modality": data.train_modality, "base": base and marker(base)["config"],
        "frozen": "vision_tower" if base else "", "replay": REPLAY_SHARE if base else 0.0}

    def init():
        if not base:
            return build_vlm(proc.tokenizer, *p["student"])
        model = AutoModelForImageTextToText.from_pretrained(base)
        model.model.vision_tower.requires_grad_(False)  # perception stays pretrained, as in LLaVA instruction tuning
        return model
    batches = warmup_batch(data.warm, data.pool if base else [])
    return sft_stage(a, os.path.join(seed_root(a), "student_init"), config, proc, init, batches, a.seed + 1,
                     f"stage 3: student warm-up SFT on {len(data.warm)} {data.train_modality} questions")


def load_pretrained(flag: str, path: str, device):
    """(model, processor) of a local checkpoint given as --student/--teacher; errors name the flag and path."""
    try:
        return (AutoModelForImageTextToText.from_pretrained(path).to(device), AutoProcessor.from_pretrained(path))
    except Exception as e:
        raise RuntimeError(f"{flag} {path}: cannot load a VLM and its processor ({type(e).__name__}: {e})") from e


def pretrained_stages(a: Args):
    """Stages 1-3 replaced by local checkpoints: (processor, teacher, student, where the student is)."""
    if not (a.student and a.teacher):
        raise ValueError("--student and --teacher go together: every method but grpo needs the teacher, "
                         "and the table compares with it")
    student, proc = load_pretrained("--student", a.student, a.device)
    teacher, teacher_proc = load_pretrained("--teacher", a.teacher, a.device)
    if teacher_proc.tokenizer.get_vocab() != proc.tokenizer.get_vocab():
        raise ValueError(f"--teacher {a.teacher} and --student {a.student} have different vocabularies; "
                         "token-level distillation needs one tokenizer")
    return proc, teacher, student, a.student


# ---------------------------------------------------------------------------------------
# Multi-GPU: torchrun starts one process per GPU; each holds a DDP replica of the student
# ---------------------------------------------------------------------------------------
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def setup_distributed(a: Args) -> Args:
    """Under torchrun: join the process group (nccl on GPUs, gloo on CPU), one GPU per process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return a
    if a.jobs > 1:
        raise ValueError("--jobs runs separate processes; under torchrun use --jobs 1")
    cuda = a.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))  # rank 0 trains the stages
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        a = replace(a, device=f"cuda:{os.environ['LOCAL_RANK']}")
    if rank():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints and writes files
    return a


def barrier():
    if dist.is_initialized():
        dist.barrier()


COUNTS_PER_STEP = ("hint_groups", "hint_written", "hint_injected")  # summed over ranks; the rest are means


def gather(obj) -> list:
    """obj from every rank, in rank order ([obj] in a single process)."""
    gathered = [None] * kepo.world_size()
    if dist.is_initialized():
        dist.all_gather_object(gathered, obj)
    else:
        gathered[0] = obj
    return gathered


def reduce_metrics(m: dict) -> dict:
    """The step's metrics over all ranks: counts summed, the rest averaged (every rank holds as many prompts)."""
    if not dist.is_initialized():
        return m
    gathered = gather(m)
    return {k: sum(g.get(k, 0.0) for g in gathered) / (1 if k in COUNTS_PER_STEP else len(gathered))
            for k in sorted(set().union(*gathered))}


def rng_states() -> list:
    """Every rank's CPU and CUDA RNG state, gathered for the checkpoint (rank order)."""
    return gather((torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))


# ---------------------------------------------------------------------------------------
# Stage 4: RL on the train modality, with checkpoints and resume
# ---------------------------------------------------------------------------------------
def run_name(a: Args) -> str:
    name = f"rl-{a.method}"
    if a.method in ("kdpo", "kepo") and a.tau != 1.0:
        name += f"-tau{a.tau:g}"
    if a.method == "kepo" and a.hint_mode != "adaptive":
        name += f"-{a.hint_mode}"
    return name


def save_checkpoint(run_dir: str, step: int, student, proc, opt):
    """Weights, optimizer and every rank's RNG state, written by rank 0 into a temporary folder, then renamed."""
    rng = rng_states()
    if rank():
        return
    tmp, final = os.path.join(run_dir, "ckpt.tmp"), os.path.join(run_dir, "ckpt")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(run_dir: str, opt_factory, device):
    """(student, optimizer, step) from run_dir/ckpt; a corrupt checkpoint names itself."""
    path = os.path.join(run_dir, "ckpt")
    try:
        student = AutoModelForImageTextToText.from_pretrained(path).to(device)
        state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True, map_location="cpu")
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); delete it to restart") from e
    if len(state["rng"]) != kepo.world_size():
        raise RuntimeError(f"checkpoint {path} was written by {len(state['rng'])} processes; resume with as many")
    opt = opt_factory(student)
    opt.load_state_dict(state["optimizer"])
    cpu_rng, cuda_rng = state["rng"][rank()]
    torch.set_rng_state(cpu_rng)
    if cuda_rng:
        torch.cuda.set_rng_state_all(cuda_rng)
    return student, opt, state["step"]


def rl_batch(a: Args, train: list[Example], step: int, n: int) -> list[Example]:
    """The step's prompts: a function of (seed, step) alone, so a resumed run sees the same ones."""
    return random.Random(f"{a.seed}-rl-{step}").sample(train, n)


def student_prompts(proc, exs: list[Example], device) -> kepo.PromptBatch:
    """The hint-free prompts of a step, worded for the model (see `chat`)."""
    return encode(proc, exs, [prompt_text(e, chat(proc)) for e in exs], device)


def hint_prompts(exs: list[Example], proc, device) -> kepo.HintPrompts:
    """The toy's two hint prompt builders for this step's prompts (indices into exs)."""
    return kepo.HintPrompts(
        request=lambda idx: encode(proc, [exs[i] for i in idx], [hint_request_text(exs[i], chat(proc))
                                                                   for i in idx], device),
        hinted=lambda idx, hints: encode(proc, [exs[i] for i in idx],
                                         [hinted_text(exs[i], h, chat(proc)) for i, h in zip(idx, hints)], device))


RANK_SEED_STRIDE = 7919  # a prime: each rank's sampling seed, far from the next run's seed


def rl_start(a: Args, p: dict, run_dir: str, student_src: str):
    """(student, optimizer, last finished step): from the run's checkpoint with --resume, else fresh."""
    opt_factory = lambda m: torch.optim.AdamW(m.parameters(), lr=p["lr"], weight_decay=0.0)  # noqa: E731
    if a.resume and os.path.exists(os.path.join(run_dir, "ckpt")):
        student, opt, start = load_checkpoint(run_dir, opt_factory, a.device)
        print(f"resumed {run_dir} at step {start}")
        return student, opt, start
    student = AutoModelForImageTextToText.from_pretrained(student_src).to(a.device)
    opt = opt_factory(student)
    torch.manual_seed(a.seed + RANK_SEED_STRIDE * rank())  # rank 0 samples as a single process does
    return student, opt, 0


def log_step(metrics_path: str, m: dict, steps: int, rate: float, show: bool):
    """Append the step's metrics to metrics.jsonl (rank 0) and, if `show`, print a progress line."""
    if rank() == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
    if show:
        print(f"  step {m['step']:4d}/{steps} reward {m['reward']:.2f} acc {m['sample_accuracy']:.2f} "
              f"cliff {m['cliff_groups']:.2f} gate {m.get('gate_frac', 0):.2f} "
              f"hint-acc {m.get('hint_accept_rate', 0):.2f} | {rate:.2f} steps/s ETA {(steps - m['step']) / rate:.0f}s",
              flush=True)


def rl(a: Args, p: dict, proc, teacher, root: str, cfg: kepo.KEPOConfig, data: Data, student_src: str):
    """RL on the train modality with kepo.kepo_step; returns the trained student. Metrics go to metrics.jsonl.

    Under torchrun every rank takes its slice of the step's prompts; rank 0 evaluates and writes.
    """
    run_dir, world = os.path.join(root, run_name(a)), kepo.world_size()
    if p["batch_prompts"] % world:
        raise ValueError(f"--batch-prompts {p['batch_prompts']} must divide among {world} processes")
    os.makedirs(run_dir, exist_ok=True)
    bf16 = a.dtype == "bf16"  # the frozen models only run forward passes: bf16 halves their memory
    ref = AutoModelForImageTextToText.from_pretrained(student_src).to(a.device, DTYPES[a.dtype]).requires_grad_(False)
    teacher = teacher.to(DTYPES[a.dtype])
    student, opt, start = rl_start(a, p, run_dir, student_src)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    # find_unused_parameters: VLMs hold weights no loss reaches (SigLIP's pooling head, for one)
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student
    if rank() == 0:
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start] if start else []
        with open(metrics_path, "w") as f:  # drop lines logged after the checkpoint we resume from
            f.writelines(json.dumps(m) + "\n" for m in kept)
    t0 = time.time()
    for step in range(start + 1, p["steps"] + 1):
        exs = rl_batch(a, data.train, step, p["batch_prompts"])[rank()::world]
        prompts = student_prompts(proc, exs, a.device)
        with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=bf16):
            m = kepo.kepo_step(model, opt, proc.tokenizer, prompts, [e.answer for e in exs], cfg, a.method,
                               teacher=teacher, ref_model=ref, hint_prompts=hint_prompts(exs, proc, a.device))
        m = reduce_metrics(m)
        m["step"] = step
        if rank() == 0 and (step % p["eval_every"] == 0 or step == p["steps"]):
            te = time.time()
            m["eval/OOD"] = summarize(data.curve, correctness(student, proc, data.curve, a), data)["OOD"]
            m["time/eval"] = time.time() - te
        log_step(metrics_path, m, p["steps"], (step - start) / (time.time() - t0),
                 show=step % p["log_every"] == 0 or step == p["steps"])
        if step % p["ckpt_every"] == 0:
            save_checkpoint(run_dir, step, student, proc, opt)
    if rank() == 0:
        student.save_pretrained(os.path.join(run_dir, "student"))
        proc.save_pretrained(os.path.join(run_dir, "student"))
    return student, run_dir


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def print_table(rows: dict[str, dict], data: Data):
    """Accuracy per modality (the train modality is in-distribution, marked *), ID and OOD means, per question type."""
    cols = data.modalities + ["ID", "OOD"] + [f"q/{q}" for q in data.qtypes]
    head = [c + "*" if c == data.train_modality else c.removeprefix("q/") for c in cols]
    width = max(len(n) for n in rows) + 2
    print("".ljust(width) + " ".join(h[:10].rjust(10) for h in head))
    for name, res in rows.items():
        print(name.ljust(width) + " ".join(f"{res[c]:10.3f}" for c in cols))


def read_metrics(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def phase_times(run_dir: str) -> dict:
    keys = ["time/generate", "time/hints", "time/teacher", "time/loss_backward", "time/eval"]
    return {k: sum(m.get(k, 0.0) for m in read_metrics(run_dir)) for k in keys}


def run_method(a: Args, p: dict, proc, teacher, root: str, before: dict, data: Data, student_src: str) -> dict:
    """Stages 4-5 (RL, evaluation) for one method or ablation; writes and returns results.json (None off rank 0)."""
    results_path = os.path.join(root, run_name(a), "results.json")
    settings = {k: p[k] for k in ("steps", "batch_prompts", "lr")} | {"group_size": a.group_size}
    if a.resume and os.path.exists(results_path):
        with open(results_path) as f:
            res = json.load(f)
        if res["settings"] == settings:
            return res
        print(f"{results_path} was made with {res['settings']}, not {settings}: running it again")
    cfg = kepo_config(a)
    print(f"stage 4: RL ({run_name(a)}) on {len(data.train)} {data.train_modality} questions, {p['steps']} steps x "
          f"{p['batch_prompts']} prompts x G={a.group_size}")
    start = time.time()
    student, run_dir = rl(a, p, proc, teacher, root, cfg, data, student_src)
    if rank():
        barrier()
        return None
    rl_time, start = time.time() - start, time.time()
    res = summarize(data.test, correctness(student, proc, data.test, a), data)
    still = cliff_mask(student, proc, data.cliff, a)
    was = before["cliff_mask"]
    res["cliff_solved"] = sum(w and not n for w, n in zip(was, still)) / max(sum(was), 1)
    res.update(method=a.method, run=run_name(a), seed=a.seed, preset=a.preset, settings=settings, rl_seconds=rl_time,
               eval_seconds=time.time() - start, phases=phase_times(run_dir), kepo_config=asdict(cfg))
    with open(results_path, "w") as f:
        json.dump(res, f, indent=1)
    barrier()
    return res


def before_rl(a: Args, p: dict, proc, teacher, student, base: str, data: Data, key: dict) -> dict:
    """Chance, teacher and warm-student accuracy, the learning cliff, the base student's descriptions and the
    premises they make, before RL; cached in the seed's folder, keyed by what produced them."""
    path = os.path.join(seed_root(a), "before_rl.json")
    key = as_json(key | {"n_test": p["n_test"], "n_cliff": p["n_cliff"], "group_size": a.group_size})
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    start = time.time()
    torch.manual_seed(a.seed)
    mask = cliff_mask(student, proc, data.cliff, a)
    rows = {"chance": summarize(data.test, chance(data.test), data),
            "teacher": summarize(data.test, correctness(teacher, proc, data.test, a), data),
            "student (before RL)": summarize(data.test, correctness(student, proc, data.test, a), data)}
    described = describe_accuracy(AutoModelForImageTextToText.from_pretrained(base).to(a.device), proc, data, a) \
        if base else None
    cliff = cliff_by_type(data.cliff, mask, data)
    before = {"rows": rows, "cliff": cliff, "cliff_mask": mask, "base_describes": described,
              "premises": premises(rows, cliff["all"], described), "seconds": time.time() - start, "key": key}
    with open(path, "w") as f:
        json.dump(before, f)
    return before


VARIANTS = {  # name -> switches that differ from the shared settings; --compare runs the first four
    "grpo": {"method": "grpo"}, "opd": {"method": "opd"}, "kdpo": {"method": "kdpo"}, "kepo": {"method": "kepo"},
    "kepo-tau0": {"method": "kepo", "tau": 0.0}, "kepo-tau2": {"method": "kepo", "tau": 2.0},
    "kepo-always": {"method": "kepo", "hint_mode": "always"},
}
METHOD_ORDER = ["grpo", "opd", "kdpo", "kepo"]


def variant_args(a: Args, name: str) -> Args:
    return Args(**{**asdict(a), "tau": 1.0, "hint_mode": "adaptive", **VARIANTS[name]})


def load_data(a: Args, p: dict) -> Data:
    return jsonl_data(a, p) if a.data else toy_data(a, p)


def main(a: Args) -> dict:
    """All stages for one seed: a.method, or the four methods (--compare), or every variant (--grid)."""
    p = dict(PRESETS[a.preset])
    p.update({k: getattr(a, k) for k in ("steps", "batch_prompts", "lr", "ckpt_every", "log_every") if getattr(a, k)})
    root = seed_root(a)
    os.makedirs(root, exist_ok=True)
    t_all, data = time.time(), load_data(a, p)
    if rank():
        barrier()  # rank 0 builds (or finds) the cached stages first; the others then load them
    if a.student or a.teacher:
        proc, teacher, student, student_src = pretrained_stages(a)
        base, key = "", {"student": os.path.abspath(a.student), "teacher": os.path.abspath(a.teacher)}
    else:
        proc = build_processor(data.pool + data.test if a.data else [])
        teacher = teacher_stage(a, p, proc, data)
        base = base_stage(a, p, proc, data)
        student = student_stage(a, p, proc, data, base)
        student_src, key = os.path.join(root, "student_init"), {"student": "student_init", "teacher": "toy"}
    key |= {"data": data.fingerprint, "train_modality": data.train_modality}
    before = before_rl(a, p, proc, teacher, student, base, data, key) if rank() == 0 else None
    if rank() == 0:
        barrier()
    if before:
        print(f"learning cliff before RL ({data.train_modality} train, G={a.group_size}, all samples wrong): "
              + ", ".join(f"{q} {v:.2f}" for q, v in before["cliff"].items()))
        print_premises(before["premises"])
    runs = list(VARIANTS) if a.grid else METHOD_ORDER if a.compare else [None]
    runs = [variant_args(a, r) if r else a for r in runs]
    rows = dict(before["rows"]) if before else {}
    if a.jobs > 1:  # independent RL runs as parallel processes (one GPU, many CPU cores), then read back
        launch_parallel(a, runs)
        runs = [replace(r, resume=True) for r in runs]
    for r in runs:
        rows[run_name(r)] = run_method(r, p, proc, teacher, root, before, data, student_src)
    if rank() == 0:
        summarize_seed(a, root, base, before, rows, data, time.time() - t_all)
    return rows


def summarize_seed(a: Args, root: str, base: str, before: dict, rows: dict, data: Data, seconds: float):
    """The accuracy table with chance, the stage times (and data share), and summary.json."""
    print(f"\ngreedy accuracy on {len(data.test)} held-out questions (* = in-distribution; chance from each "
          "question's options):")
    print_table(rows, data)
    stages = {name: marker(path)["times"] for name, path in stage_paths(a, root, base).items()}
    stages["before_rl"] = {"seconds": round(before["seconds"], 1)}
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"cliff_before_rl": before["cliff"], "premises": before["premises"], "rows": rows,
                   "stages": stages, "seconds": seconds}, f, indent=1)
    times = [f"{n} {t['seconds']:.0f}s" + (f" (data {t['data_share']:.1%})" if "data_share" in t else "")
             for n, t in stages.items()]
    print("stage times (as each was trained; cached stages are reused): " + ", ".join(times))
    print(f"\nresults in {root}/ ({seconds:.0f}s)")


def stage_paths(a: Args, root: str, base: str) -> dict:
    """The supervised stages this run trained or reused (none with --student/--teacher)."""
    if a.student:
        return {}
    paths = {"teacher": os.path.join(a.out, f"{tag(a)}-teacher"), "base": base,
             "warm-up": os.path.join(root, "student_init")}
    return {n: p for n, p in paths.items() if p}


def launch_parallel(a: Args, runs: list[Args]):
    """Run each variant's RL as its own `train_small.py --resume` process, at most a.jobs at once."""
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < a.jobs:
            r = pending.pop(0)
            one_run = replace(r, compare=False, grid=False, report=False, jobs=1, resume=True)
            flags = [f"--{f.name.replace('_', '-')}" + ("" if f.type is bool else f"={getattr(one_run, f.name)}")
                     for f in fields(Args) if f.type is not bool or getattr(one_run, f.name)]
            log = open(os.path.join(r.out, f"{tag(r)}-seed{r.seed}", f"{run_name(r)}.log"), "w")
            active.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *flags], stdout=log,
                                           stderr=subprocess.STDOUT))
        time.sleep(1)
        done = [q for q in active if q.poll() is not None]
        for q in done:
            if q.returncode:
                raise RuntimeError(f"a parallel run failed ({' '.join(q.args[2:])}); see its .log in {a.out}")
        active = [q for q in active if q.poll() is None]


# ---------------------------------------------------------------------------------------
# Report over seeds (--report, and after --grid): mean +- std table, hint numbers, curves
# ---------------------------------------------------------------------------------------
CURVES = {"reward": "training reward", "cliff_groups": "all-wrong groups", "distill_loss": "distillation loss",
          "gate_frac": "gate fraction", "eval/OOD": "OOD accuracy (greedy)"}


def collect(a: Args) -> tuple[dict[str, dict[int, dict]], dict[int, dict]]:
    """(name -> seed -> results, seed -> before-RL record) for the runs and before-RL rows under --out."""
    found, befores = {}, {}
    for seed_dir in sorted(glob.glob(os.path.join(a.out, f"{tag(a)}-seed*"))):
        seed = int(seed_dir.rsplit("-seed", 1)[1])
        if not os.path.exists(os.path.join(seed_dir, "before_rl.json")):
            continue
        with open(os.path.join(seed_dir, "before_rl.json")) as f:
            befores[seed] = json.load(f)
        for name, row in befores[seed]["rows"].items():
            found.setdefault(name, {})[seed] = row
        for path in sorted(glob.glob(os.path.join(seed_dir, "rl-*", "results.json"))):
            with open(path) as f:
                res = json.load(f)
            metrics = read_metrics(os.path.dirname(path))
            for key in ("hint_groups", "hint_accept_rate", "hint_injected"):
                res[key] = sum(m.get(key, 0.0) for m in metrics) / len(metrics)
            res["curves"] = {k: [m.get(k) for m in metrics] for k in CURVES}
            found.setdefault(res["run"], {})[seed] = res
    return found, befores


def mean_std(values: list[float]) -> str:
    values = list(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def premises_table(befores: dict[int, dict]) -> list[str]:
    """One row per premise, one column per seed."""
    seeds = sorted(befores)
    first = befores[seeds[0]]["premises"]
    target = lambda it: " and ".join(f"{op} {x:.2f}" for op, x in ((">=", it["min"]), ("<=", it["max"]))  # noqa: E731
                                     if x is not None)
    rows = [[it["premise"].split(" (")[0], *(f"{befores[s]['premises'][i]['value']:.3f}"
                                            + ("" if befores[s]["premises"][i]["holds"] else " ✗") for s in seeds),
             target(it)] for i, it in enumerate(first)]
    return md_table(["premise", *(f"seed {s}" for s in seeds), f"target (seed {seeds[0]})"], rows)


def paired_table(found: dict[str, dict[int, dict]]) -> list[str]:
    """KEPO minus each baseline, seed by seed (the same warm student and test questions): mean ± std, wins."""
    rows = []
    for other in ("rl-grpo", "rl-opd", "rl-kdpo"):
        seeds = sorted(set(found.get("rl-kepo", {})) & set(found.get(other, {})))
        if not seeds:
            continue
        cells = []
        for col in ("OOD", "ID"):
            diffs = [found["rl-kepo"][s][col] - found[other][s][col] for s in seeds]
            cells += [mean_std(diffs), f"{sum(d > 0 for d in diffs)}/{len(diffs)}"]
        rows.append([f"kepo - {other[3:]}", *cells])
    return md_table(["paired difference", "OOD", "seeds > 0", "ID", "seeds > 0"], rows)


def report(a: Args):
    """Markdown tables over seeds to {out}/{tag}-report.md, curves to {out}/{tag}-curves.png."""
    found, befores = collect(a)
    if not befores:
        raise SystemExit(f"--report: no results under {a.out} for {tag(a)}")
    order = ["chance", "teacher", "student (before RL)"] + ["rl-" + v for v in VARIANTS]
    found = dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    chance_row, train = next(iter(found["chance"].values())), next(iter(befores.values()))["key"]["train_modality"]
    qcols = [c for c in chance_row if c.startswith("q/")]
    cols = [c for c in chance_row if c not in qcols and c not in ("ID", "OOD")] + ["ID", "OOD"]
    lines = premises_table(befores) + [""]
    lines += md_table(["run", "seeds", *(c + (" (ID)" if c == train else "") for c in cols)],
                      [[n, str(len(rs)), *(mean_std(r[c] for r in rs.values()) for c in cols)]
                       for n, rs in found.items()]) + [""]
    lines += md_table(["run", *(q[2:] for q in qcols)],
                      [[n, *(mean_std(r[c] for r in rs.values()) for c in qcols)] for n, rs in found.items()]) + [""]
    lines += paired_table(found) + [""]
    hint_runs = {n: rs for n, rs in found.items() if n.startswith("rl-")}
    lines += md_table(["run", "triggered groups / step", "groups with an accepted hint", "injected / step",
                       "cliff prompts solved after RL", "RL seconds"],
                      [[n, *(mean_std(r[k] for r in rs.values()) for k in ("hint_groups", "hint_accept_rate",
                                                                           "hint_injected", "cliff_solved",
                                                                           "rl_seconds"))]
                       for n, rs in hint_runs.items()])
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"{tag(a)}-report.md"), "w") as f:
        f.write(text)
    print(text)
    plot_curves(a, {n: list(rs.values()) for n, rs in hint_runs.items()})


def plot_curves(a: Args, runs: dict[str, list[dict]]):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--report: curves need matplotlib (pip install matplotlib); the tables above are complete")
        return
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES.items()):
        for i, (name, rs) in enumerate(runs.items()):
            points = [[(s + 1, v) for s, v in enumerate(r["curves"][key]) if v is not None] for r in rs]
            if not points[0]:
                continue
            steps = [x for x, _ in points[0]]
            mean = [sum(p[j][1] for p in points) / len(points) for j in range(len(steps))]
            w = 1 if key == "eval/OOD" else 10  # per-step metrics: a 10-step moving average
            smooth = [sum(mean[max(0, j - w + 1):j + 1]) / len(mean[max(0, j - w + 1):j + 1]) for j in range(len(mean))]
            ax.plot(steps, smooth, label=name, lw=1.3, color=f"C{i}", ls="--" if "-" in name[3:] else "-")
        ax.set_title(title)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=7)
    seeds = len(next(iter(runs.values())))
    fig.suptitle(f"{tag(a)}: mean over {seeds} seeds (per-step curves: 10-step moving average)")
    fig.tight_layout()
    path = os.path.join(a.out, f"{tag(a)}-curves.png")
    fig.savefig(path, dpi=110)
    print(f"curves in {path}")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=help)
    a = Args(**vars(parser.parse_args(argv)))
    if a.preset not in PRESETS or a.method not in METHOD_ORDER or a.hint_mode not in ("adaptive", "always") \
            or a.dtype not in DTYPES:
        parser.error(f"--preset in {list(PRESETS)}, --method in {METHOD_ORDER}, --hint-mode in adaptive/always, "
                     f"--dtype in {list(DTYPES)}")
    return a


if __name__ == "__main__":
    args = parse_args()
    hf_logging.disable_progress_bar()
    args = setup_distributed(args)
    if args.grid:
        for seed in map(int, args.seeds.split(",")):
            main(replace(args, seed=seed, resume=True))
    if not (args.grid or args.report):
        main(args)
    elif rank() == 0:
        report(args)
    if dist.is_initialized():
        dist.destroy_process_group()
