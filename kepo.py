"""KEPO: Knowledge-Enhanced Preference Optimization (arXiv 2602.00400), one file.

KEPO is GRPO for vision-language models plus, from a stronger teacher,
quality-gated on-policy distillation (a token-level generalized JSD on the
student's samples whose reward reaches tau) and hints: for a group with no
correct rollout (the "learning cliff": its advantages are all 0) the teacher
writes a hint from the ground truth; correct samples drawn with it replace
rollouts of the group, under the hint-free prompt.

Eq. 7 as computed, minimised, on N = B*G rollouts y_i, r_i = accuracy + format:
    loss    = policy + distill_coef * distill
    policy  = 1/N sum_i 1/|y_i| sum_t (-A_i ratio_it + beta_rl k3_it)
    distill = sum_{i: r_i >= tau} sum_t JSD_it / sum_{i: r_i >= tau} |y_i|
A_i = (r_i - mean_group) / (std_group + 1e-4); one pass per batch (ratio 1).
distill is a token mean over gated tokens, as in the authors' code, GKD and
TRL (not eq. 7's 1/G weights). Methods: grpo; opd (GKD: the JSD on every
rollout, no reward term); kdpo (grpo + gated JSD); kepo (kdpo + hints).

Sections follow a step; eq. 7 is `kepo_backward`. "[ours]": the authors' code
differs. One image a prompt: batch-first (LLaVA, Gemma 3) or patches with
image_grid_thw (Qwen2-VL). Teacher and student share a tokenizer.
"""
import math
import re
import time
from collections import namedtuple
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

METHODS = ("grpo", "opd", "kdpo", "kepo")
HINT_MODES = ("adaptive", "always")  # cliff groups, or all
CLIFF_TRIGGERS = ("accuracy", "reward")  # no correct rollout, or all r = 0

@dataclass
class KEPOConfig:
    """A step's settings; defaults: the authors' released runs."""
    group_size: int = 8  # G >= 2 samples per prompt
    temperature: float = 0.9  # > 0, of every generation
    top_p: float = 0.95  # in (0, 1]; top_k is always off
    max_new_tokens: int = 1024  # >= 1
    max_hint_tokens: int = 64  # >= 1; [ours] a sentence (theirs 1024)
    clip_eps: float = 0.2  # > 0; inactive at ratio 1
    beta_rl: float = 0.0  # >= 0, weight of the k3 KL to ref_model
    tau: float = 1.0  # in [0, 2]: quality gate r >= tau
    beta_jsd: float = 0.5  # in [0, 1]: 0 forward KL, 1 reverse KL
    jsd_temperature: float = 1.0  # > 0
    distill_coef: float = 1.0  # > 0
    num_hinted: int = 2  # K in [1, G], hinted samples per group
    max_attempts: int = 5  # >= 1 rejection-sampling tries
    hint_mode: str = "adaptive"  # in HINT_MODES
    cliff_trigger: str = "accuracy"  # in CLIFF_TRIGGERS ([ours] accuracy)
    max_grad_norm: float = 1.0  # > 0
    micro_batch_size: int | None = None  # >= 1 rows a backward; None: N

    def __post_init__(self):
        """Refuse any value that would silently mean something else."""
        c, mb = self, self.micro_batch_size
        rules = dict(
            group_size=c.group_size >= 2, temperature=c.temperature > 0,
            top_p=0 < c.top_p <= 1, max_new_tokens=c.max_new_tokens >= 1,
            max_hint_tokens=c.max_hint_tokens >= 1, clip_eps=c.clip_eps > 0,
            beta_rl=c.beta_rl >= 0, tau=0 <= c.tau <= 2, beta_jsd=0 <= c.beta_jsd <= 1,
            jsd_temperature=c.jsd_temperature > 0, distill_coef=c.distill_coef > 0,
            num_hinted=1 <= c.num_hinted <= c.group_size, max_attempts=c.max_attempts >= 1,
            hint_mode=c.hint_mode in HINT_MODES, cliff_trigger=c.cliff_trigger in CLIFF_TRIGGERS,
            max_grad_norm=c.max_grad_norm > 0, micro_batch_size=mb is None or mb >= 1)
        for name, ok in rules.items():
            value = getattr(self, name)
            if not ok or isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"KEPOConfig.{name}={value!r}: out of range")

# ---- 1. Generation: G samples per prompt from the current student ----
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")  # [B, P], as ids

def index_vision(vision, index):
    """Vision inputs of prompts `index` [M]: batch-first, or Qwen2-VL's
    patches split by image_grid_thw [B, 3], regrouped."""
    if "image_grid_thw" not in vision:
        return {k: v[index] for k, v in vision.items()}
    sizes = vision["image_grid_thw"].prod(-1).tolist()
    patches = vision["pixel_values"].split(sizes)
    out = {k: v[index] for k, v in vision.items() if k != "pixel_values"}
    return out | {"pixel_values": torch.cat([patches[i] for i in index])}

@dataclass
class PromptBatch:
    """B tokenized prompts, left-padded, with their vision inputs."""
    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    vision: dict = field(default_factory=dict)  # pixel_values [B, ...], ...

    def select(self, index):
        i = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return PromptBatch(self.input_ids[i], self.attention_mask[i],
                           index_vision(self.vision, i))

@dataclass
class Rollouts:
    """N = B*G completions; row i answers prompt i // G."""
    prompts: PromptBatch  # each row's: input_ids [N, P]
    completion_ids: torch.Tensor  # [N, T], pad after the first stop id
    completion_mask: torch.Tensor  # [N, T], 1 up to the first stop id
    texts: list[str]

    def select(self, index):
        i = torch.as_tensor(index, dtype=torch.long, device=self.completion_ids.device)
        return Rollouts(self.prompts.select(i), self.completion_ids[i],
                        self.completion_mask[i], [self.texts[j] for j in i])

def stop_ids(tokenizer, model):
    """EOS ids: the tokenizer's and generation_config's (a chat turn's end)."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({tokenizer.eos_token_id, *ids} - {None})

def suppressed_ids(tokenizer, model):
    """Pad, BOS, UNK, image ids: never sampled (an image token breaks a
    forward), masked in scoring."""
    names = ("image_token_id", "image_token_index", "video_token_id",
             "vision_start_token_id", "vision_end_token_id")
    ids = {getattr(model.config, name, None) for name in names}
    ids |= {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    return sorted(ids - {None, *stop_ids(tokenizer, model)})

def completion_mask(ids, stops):
    """[N, T] int, 1 up to and including the first stop id (or all 1)."""
    is_stop = torch.isin(ids, torch.tensor(stops, device=ids.device))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), ids.shape[1])
    return (torch.arange(ids.shape[1], device=ids.device) <= first[:, None]).int()

@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: PromptBatch, n, cfg: KEPOConfig,
                      suppress, max_new_tokens=None, greedy=False):
    """n samples per prompt: Rollouts of B*n rows."""
    if (prompts.attention_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded")
    rows = prompts.select(torch.arange(len(prompts.input_ids)).repeat_interleave(n))
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=0)  # else transformers applies top_k=50
    stops = stop_ids(tokenizer, model)
    out = model.generate(
        input_ids=rows.input_ids, attention_mask=rows.attention_mask, **rows.vision,
        max_new_tokens=max_new_tokens or cfg.max_new_tokens, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=sharded(model),
        suppress_tokens=suppress or None, **(dict(do_sample=False) if greedy else sampling))
    ids = out[:, rows.input_ids.shape[1]:]
    mask = completion_mask(ids, stops)
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollouts(rows, ids, mask, tokenizer.batch_decode(ids, skip_special_tokens=True))

def over_completion(model, vision, length):
    """`vision`, TOKEN_ALIGNED inputs extended over `length` new tokens by
    the model's own (private) generate rule: it differs by family."""
    aligned = {k: v for k, v in vision.items() if k in TOKEN_ALIGNED}
    bare = getattr(model, "module", model)  # DDP wraps the model
    one = bare._update_model_kwargs_for_generation({}, dict(aligned)) if aligned else {}
    return vision | {k: torch.cat([v, one[k][:, -1:].expand(-1, length)], 1)
                     for k, v in aligned.items()}

def completion_logits(model, rollouts, suppress):
    """[N, T, V] logits of the completion tokens. Suppressed ids get -1e9,
    not -inf: the KL's 0 * (-inf + inf) would be NaN."""
    p, ids = rollouts.prompts, rollouts.completion_ids
    out = model(input_ids=torch.cat([p.input_ids, ids], 1),
                attention_mask=torch.cat([p.attention_mask, rollouts.completion_mask], 1),
                **over_completion(model, p.vision, ids.shape[1]),
                logits_to_keep=ids.shape[1] + 1, use_cache=False)
    logits = out.logits[:, :-1]
    if suppress:
        ids = torch.tensor(suppress, device=logits.device)
        logits = logits.index_fill(-1, ids, -1e9)
    return logits

def selective_logps(logits, ids, temperature):
    """[N, T] fp32 log pi(ids) from logits [N, T, V], any dtype. [ours]
    Logits / the sampling temperature, as TRL (theirs: raw logits)."""
    logps = (logits.float() / temperature).log_softmax(-1)
    return logps.gather(-1, ids[..., None]).squeeze(-1)

# ---- 2. Reward r = accuracy + format; group-relative advantages ----
_TAG = r"</?(?:think|answer)>"
_FREE = rf"(?:(?!{_TAG}).)*"  # no think/answer tag inside
# [ours] repeated or nested tags fail: no hedging across answers
FORMAT_RE = re.compile(rf"\s*<think>{_FREE}</think>\s*<answer>{_FREE}</answer>\s*", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
LETTER_RE = re.compile(r"\s*\(?([A-Za-z])\)?(?![A-Za-z])")
ADV_EPS = 1e-4  # added to std_g

def format_reward(completions):
    """[N] 1.0 iff a text is <think>...</think> <answer>...</answer>."""
    return torch.tensor([float(FORMAT_RE.fullmatch(c) is not None) for c in completions])

def accuracy_reward(completions, answers):
    """[N] 1.0 iff the letter in the last <answer> is the answer. [ours]
    "(B)", "B. cyst" read as B (theirs: math_verify, exact)."""
    if len(completions) != len(answers):
        raise ValueError("one answer a completion")
    scores = []
    for text, answer in zip(completions, answers):
        tags = ANSWER_RE.findall(text)
        letter = LETTER_RE.match(tags[-1]) if tags else None
        scores.append(float(bool(letter) and letter[1].upper() == answer.strip().upper()))
    return torch.tensor(scores)

def group_advantages(rewards, group_size):
    """[N] (r_i - mean_g) / (std_g + ADV_EPS) over groups of G consecutive
    rows; an all-equal group gives 0 (the cliff)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size}: must be >= 2 and divide N")
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    return (centred / (r.std(1, keepdim=True) + ADV_EPS)).view(-1)

# ---- 3. Quality gate: distil only trajectories with r_i >= tau ----
def quality_gate(rewards, tau):
    """[N] bool 1{r_i >= tau}: tau = 1 admits a well-formatted wrong answer."""
    return rewards >= tau

# ---- 4. Token-level teacher divergence: GKD's generalized JSD ----
JSD_CHUNK_TOKENS = 64  # a chunk's fp32 [64, V] is recomputed

def jsd_token_sum(student_logits, teacher_logits, beta, temperature):
    """[] beta KL(p_T||M) + (1-beta) KL(p_S||M), M = beta p_T + (1-beta) p_S,
    summed over tokens; logits [M, V]. beta = 0: KL(p_T||p_S), 1: KL(p_S||p_T)."""
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    # F.kl_div(input, target) is KL(target || input), the reverse of the
    # maths' order: F.kl_div(s, t) is KL(p_T || p_S)
    if beta == 0:
        return F.kl_div(s, t, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(t, s, reduction="sum", log_target=True)
    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))  # log M
    return (beta * F.kl_div(m, t, reduction="sum", log_target=True)
            + (1 - beta) * F.kl_div(m, s, reduction="sum", log_target=True))

def generalized_jsd(student_logits, teacher_logits, mask, beta, temperature):
    """[] mean JSD over masked tokens (0 if none); logits [N, T, V], mask
    [N, T]. In checkpointed chunks: no fp32 [N, T, V]."""
    s, t = student_logits[mask.bool()], teacher_logits[mask.bool()]  # [M, V]
    if len(s) == 0:
        return student_logits.sum() * 0.0
    chunks = zip(s.split(JSD_CHUNK_TOKENS), t.split(JSD_CHUNK_TOKENS))
    total = sum(checkpoint(jsd_token_sum, s_part, t_part, beta, temperature,
                           use_reentrant=False) for s_part, t_part in chunks)
    return total / len(s)

def gated_jsd_sum(student_logits, teacher, rollouts, gate, cfg, suppress, terms=None):
    """[] JSD summed over gated rows' tokens (gate [N]); `terms` gets each
    row's [T_i] terms. [ours] Teacher on them only; none: 0 (theirs: 0/0)."""
    rows = lockstep(gate.nonzero().flatten().tolist(), teacher)
    if not rows:
        return student_logits.sum() * 0.0
    with torch.no_grad():
        teacher_logits = completion_logits(teacher, rollouts.select(rows), suppress)
    mask = rollouts.completion_mask[rows] * gate[rows, None]  # a stand-in adds 0
    beta, temperature = cfg.beta_jsd, cfg.jsd_temperature
    jsd = generalized_jsd(student_logits[rows], teacher_logits, mask, beta, temperature)
    if terms is not None:  # token by token
        for s, t, m in zip(student_logits[rows].detach(), teacher_logits, mask.bool()):
            terms += [torch.stack([jsd_token_sum(x[None], y[None], beta, temperature)
                                   for x, y in zip(s[m], t[m])])] if m.any() else []
    return jsd * mask.sum()

# ---- 5. Hint learning: the teacher writes hints from the ground truth ----
HINT_RE = re.compile(r"<hint>(.*?)</hint>", re.S)

def extract_hint(text):
    """The first <hint>...</hint>'s text, or None ([ours] if cut off too)."""
    match = HINT_RE.search(text)
    return (match.group(1).strip() or None) if match else None

@dataclass
class HintPrompts:
    """The caller's prompts for groups (of the B): the teacher shown the
    answer and asked for a <hint>; the student asked with it and the answer
    (the authors' "v1")."""
    request: Callable[[list[int]], PromptBatch]
    hinted: Callable[[list[int], list[str]], PromptBatch]

def write_hints(teacher, tokenizer, requests, cfg, suppress):
    """A sampled hint a request, None without a tag."""
    out = generate_rollouts(teacher, tokenizer, requests, 1, cfg, suppress,
                            max_new_tokens=cfg.max_hint_tokens)
    return [extract_hint(t) for t in out.texts]

# ---- 6. Rejection sampling: correct hinted samples join their group ----
def cliff_groups(accuracy, rewards, group_size, trigger):
    """Groups with no correct rollout, or ("reward", theirs) all r = 0:
    [ours] a trained model rarely fails the format."""
    signal = {"accuracy": accuracy, "reward": rewards}[trigger]
    return (signal.view(-1, group_size).amax(1) == 0).nonzero().flatten().tolist()

Hinted = namedtuple("Hinted", "ids text correct kept")

def rejection_sample(student, tokenizer, hinted, answers, cfg, suppress):
    """Per hinted prompt, its samples in max_attempts tries of K; the first
    K correct kept, [ours] each alone (theirs: all or none)."""
    k, drawn = cfg.num_hinted, [[] for _ in answers]
    kept = lambda i: sum(s.kept for s in drawn[i])  # noqa: E731
    for _ in range(cfg.max_attempts):
        need = [i for i in range(len(drawn)) if kept(i) < k]
        todo = lockstep(need, student)  # FSDP2: the same calls on every rank
        if not todo:
            break
        out = generate_rollouts(student, tokenizer, hinted.select(todo), k, cfg, suppress)
        correct = accuracy_reward(out.texts, [answers[i] for i in todo for _ in range(k)])
        for row, ok in enumerate(correct.bool().tolist() if need else []):  # no stand-in
            i = todo[row // k]
            ids = out.completion_ids[row][out.completion_mask[row].bool()]
            drawn[i].append(Hinted(ids, out.texts[row], ok, ok and kept(i) < k))
    return drawn

def inject(rollouts, rewards, group_size, accepted, pad_id):
    """Rows of group g replaced by accepted[g], under their hint-free
    prompt, unweighted; and {row: (g, j, old text)}. [ours] Distinct
    slots, lowest reward first."""
    seqs = [ids[m.bool()] for ids, m in zip(rollouts.completion_ids,
                                            rollouts.completion_mask)]
    texts, replaced = list(rollouts.texts), {}
    for g, samples in accepted.items():
        group = rewards[g * group_size:(g + 1) * group_size]
        slots = g * group_size + torch.argsort(group, stable=True)
        for j, (slot, sample) in enumerate(zip(slots.tolist(), samples)):
            replaced[slot] = (g, j, texts[slot])
            seqs[slot], texts[slot] = sample.ids, sample.text
    ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    ones = [torch.ones_like(s, dtype=torch.int) for s in seqs]
    return replace(rollouts, completion_ids=ids, texts=texts,
                   completion_mask=pad_sequence(ones, batch_first=True)), replaced

def knowledge_enhance(student, teacher, tokenizer, rollouts, rewards, answers,
                      groups, hint_prompts, cfg, suppress, trace=None):
    """Hints for `groups`, rejection sampling, injection (answers [B]);
    `trace` gets hints {g: str or None}, hinted, replaced."""
    asked = lockstep(groups, student, teacher)
    if not asked:
        return rollouts, {}
    hints = write_hints(teacher, tokenizer, hint_prompts.request(asked), cfg, suppress)
    # [ours] a group with no <hint> tag is not sampled
    written = {g: h for g, h in zip(groups, hints) if h is not None}
    sampled, samples = lockstep(list(written), student), []
    if sampled:
        hinted = hint_prompts.hinted(sampled, [written.get(g, "") for g in sampled])
        samples = rejection_sample(student, tokenizer, hinted,
                                   [answers[g] for g in sampled], cfg, suppress)
    drawn = dict(zip(written, samples))
    accepted = {g: kept for g, s in drawn.items() if (kept := [x for x in s if x.kept])}
    stats = {"hint_groups": len(groups), "hint_written": len(written),
             "hint_accept_rate": len(accepted) / max(len(groups), 1),
             "hint_injected": sum(len(s) for s in accepted.values())}
    out, replaced = inject(rollouts, rewards, cfg.group_size, accepted, tokenizer.pad_token_id)
    if trace is not None:
        trace |= {"hints": dict(zip(groups, hints)), "hinted": drawn, "replaced": replaced}
    return out, stats

# ---- 7. Loss and step: eq. 7, then one optimizer step ----
def k3_kl(logps, ref_logps):
    """[N, T] k3 estimate of KL(pi||pi_ref), d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1

def masked_mean_per_sequence(values, mask):
    """[] mean over sequences of their token means; inputs [N, T]."""
    mask = mask.to(values.dtype)
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

def policy_loss(logps, old_logps, advantages, mask, clip_eps, ref_logps, beta):
    """[] clipped PPO surrogate (+ beta k3 KL), a token mean per sequence,
    then the mean; [N, T] inputs, advantages [N]."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if ref_logps is not None and beta != 0:
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    return masked_mean_per_sequence(per_token, mask)

def reference_logps(ref_model, rollouts, logps, cfg, suppress):
    """[N, T] log pi_ref, or None; off the mask the student's (ids there sit
    near -1e9, ref - logp can be 128, and exp(128) * 0 is NaN)."""
    if ref_model is None:
        return None
    with torch.no_grad():
        logits = completion_logits(ref_model, rollouts, suppress)
        ref = selective_logps(logits, rollouts.completion_ids, cfg.temperature)
    return torch.where(rollouts.completion_mask.bool(), ref, logps.detach())

def kepo_backward(student, teacher, rollouts, rewards, method, cfg, ref_model,
                  suppress, trace=None):
    """Accumulate eq. 7's gradient on N rollouts, rewards [N], micro_batch_size
    rows at a time; `trace` gets them, advantages, gate [N], jsd's terms."""
    n = len(rewards)
    advantages = group_advantages(rewards, cfg.group_size)  # whole groups
    if method == "grpo":
        gate = torch.zeros_like(rewards, dtype=torch.bool)
    elif method == "opd":  # GKD: every rollout distilled, no reward term
        gate = torch.ones_like(rewards, dtype=torch.bool)
        advantages = torch.zeros_like(advantages)
    else:
        gate = quality_gate(rewards, cfg.tau)
    # the JSD's denominator: all ranks' gated tokens
    n_gated = all_ranks_sum(rollouts.completion_mask[gate].sum().float())
    chunks = torch.arange(n, device=rewards.device).split(cfg.micro_batch_size or n)
    totals, terms = {}, None if trace is None else []
    for k, rows in enumerate(chunks):
        r, share = rollouts.select(rows), len(rows) / n
        logits = completion_logits(student, r, suppress)  # [m, T, V]
        logps = selective_logps(logits, r.completion_ids, cfg.temperature)
        ref = reference_logps(ref_model, r, logps, cfg, suppress)
        policy = share * policy_loss(logps, logps.detach(), advantages[rows],
                                     r.completion_mask, cfg.clip_eps, ref, cfg.beta_rl)
        # x world size: DDP and FSDP average ranks' gradients
        jsd = gated_jsd_sum(logits, teacher, r, gate[rows], cfg, suppress, terms)
        distill = jsd * world_size() / n_gated.clamp(min=1)
        loss = policy + cfg.distill_coef * distill  # eq. 7, negated
        sync = k == len(chunks) - 1 or not hasattr(student, "no_sync")
        with nullcontext() if sync else student.no_sync():  # DDP: one all-reduce
            loss.backward()
        parts = {"loss": loss, "policy_loss": policy, "distill_loss": distill}
        if ref is not None:
            kl = k3_kl(logps.detach(), ref)
            parts["kl"] = share * masked_mean_per_sequence(kl, r.completion_mask)
        totals = {key: totals.get(key, 0.0) + v.item() for key, v in parts.items()}
    if trace is not None:
        trace |= {"rollouts": rollouts, "rewards": rewards, "advantages": advantages,
                  "gate": gate, "jsd": terms}
    return totals | {"gate_frac": gate.float().mean().item()}

def kepo_step(student, optimizer, tokenizer, prompts: PromptBatch, answers,
              cfg: KEPOConfig, method="kepo", teacher=None, ref_model=None,
              hint_prompts: HintPrompts | None = None, trace: dict | None = None):
    """One step on B prompts, answers [B]; returns metrics; `trace` (a dict)
    gets what it computed. Multi-GPU: each rank its B prompts, a DDP student
    or FSDP2-sharded models."""
    check_step_inputs(method, teacher, ref_model, hint_prompts, cfg, prompts, answers)
    policy = getattr(student, "module", student)  # DDP: sample unwrapped
    g, suppress = cfg.group_size, suppressed_ids(tokenizer, policy)
    row_answers = [a for a in answers for _ in range(g)]
    clock = time.perf_counter()
    rollouts = generate_rollouts(policy, tokenizer, prompts, g, cfg, suppress)
    acc, fmt = accuracy_reward(rollouts.texts, row_answers), format_reward(rollouts.texts)
    cliff = cliff_groups(acc, acc + fmt, g, cfg.cliff_trigger)
    m = {"sample_accuracy": acc.mean().item(), "sample_format": fmt.mean().item(),
         "cliff_groups": len(cliff) / len(answers), "time/generate": time.perf_counter() - clock}
    clock = time.perf_counter()
    if method == "kepo":
        groups = cliff if cfg.hint_mode == "adaptive" else [*range(len(answers))]
        rollouts, hints = knowledge_enhance(policy, teacher, tokenizer, rollouts, acc + fmt,
                                            answers, groups, hint_prompts, cfg, suppress, trace)
        m |= hints
    rewards = accuracy_reward(rollouts.texts, row_answers) + format_reward(
        rollouts.texts)  # rescored: injected rows are correct
    m["time/hints"], clock = time.perf_counter() - clock, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    m |= kepo_backward(student, teacher, rollouts, rewards.to(prompts.input_ids.device),
                       method, cfg, ref_model, suppress, trace)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
    optimizer.step()
    m["time/loss_backward"] = time.perf_counter() - clock
    stds, length = rewards.view(-1, g).std(1), rollouts.completion_mask.sum(1)
    return m | {"grad_norm": grad_norm.item(), "reward": rewards.mean().item(),
                "reward_std": stds.mean().item(), "frac_reward_zero_std":
                (stds == 0).float().mean().item(),
                "completions/mean_length": length.float().mean().item()}

def check_step_inputs(method, teacher, ref_model, hint_prompts, cfg, prompts, answers):
    """Raise before sampling if the step cannot run."""
    for bad, why in [(method not in METHODS, f"method must be in {METHODS}"),
                     (method != "grpo" and teacher is None, "it needs a teacher"),
                     (method == "kepo" and hint_prompts is None, "kepo needs hint_prompts"),
                     (cfg.beta_rl > 0 and ref_model is None, "beta_rl needs ref_model"),
                     (len(prompts.input_ids) != len(answers), "one answer a prompt")]:
        if bad:
            raise ValueError(why)

# ---- 8. Multi-GPU plumbing: DDP and FSDP2 step as one process ----
def world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_initialized() else 1

def sharded(model):
    """FSDP2-sharded? Then ranks run the same forwards."""
    return world_size() > 1 and isinstance(model, FSDPModule)

def lockstep(rows, *models):
    """`rows`, or a stand-in [0] to drop if models are sharded and only
    other ranks have rows; [] if none has."""
    shards = [m for m in models if m is not None and sharded(m)]
    if not shards:
        return rows
    count = torch.tensor(float(len(rows)), device=next(shards[0].parameters()).device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return rows or ([0] if count.item() > 0 else [])

def all_ranks_sum(x):
    """x summed over ranks, in place."""
    if world_size() > 1:
        torch.distributed.all_reduce(x)
    return x
