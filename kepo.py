"""KEPO: Knowledge-Enhanced Preference Optimization (Yang et al., 2026, arXiv 2602.00400), in one file.

KEPO is GRPO for vision-language models with two additions from a stronger teacher:
  * quality-gated on-policy distillation: a token-level generalized JSD to the teacher, on
    the student's own samples, but only on trajectories whose reward reaches tau;
  * knowledge-enhanced exploration: when a group has no correct rollout (the "learning
    cliff", where GRPO's advantages are all zero), the teacher writes a hint from the ground
    truth, the student samples with the hint, and correct hinted samples replace rollouts of
    that group under the ORIGINAL hint-free prompt.

The objective (paper, eq. 7), maximised:
  J = E_x E_{y_1..G ~ pi(.|x)} [ (1/G) sum_i ( A_i-weighted PG term_i - 1{r_i >= tau} D_i ) ] - beta KL(pi || pi_ref)
What this file computes, minimised (loss = -J up to normalisation), per step on N = B*G rollouts:
  loss = policy_loss + distill_coef * distill
  policy_loss = (1/N) sum_i (1/|y_i|) sum_t [ -A_i * ratio_it + beta_rl * k3_it ]      (token mean per sequence,
                                                                                    then mean over sequences)
  distill     = sum_{i: r_i >= tau} sum_t JSD_beta(pi_T || pi_theta)_it / sum_{i: r_i >= tau} |y_i|
The distillation term is a token mean over the gated tokens of the batch, as in the authors'
code (GKD and TRL normalise the same way), not the (1/G)-weighted sum of eq. 7 as written: with
1 of 8 rows gated, that row gets full weight instead of 1/8, so the term does not shrink as the
gate tightens. An empty gate gives exactly 0.

Method names (`kepo_step(method=...)`):
  grpo  the policy loss only (sections 1-3 and 8 below: no gate, no teacher, no hints)
  opd   on-policy distillation (GKD with lambda = 1): the JSD on every rollout, no reward term
  kdpo  GRPO + quality-gated distillation, no hints (the authors' name for this ablation)
  kepo  kdpo + hints (knowledge-enhanced exploration) on cliff groups

One training step, in reading order of this file:
  1. generation ............ generate_rollouts, completion_logits, selective_logps (sharded, on_any_rank)
  2. reward ................ format_reward, accuracy_reward, kepo_reward
  3. GRPO .................. group_advantages, policy_loss (k3_kl)
  4. quality gate .......... quality_gate
  5. teacher divergence .... jsd_token_sum, generalized_jsd, gated_tokens, distillation_loss
  6. hint learning ......... extract_hint, write_hints
  7. rejection sampling .... tries_per_call, rejection_sample, cliff_groups, inject, knowledge_enhance
  8. loss and step ......... micro_batch_loss, kepo_backward, kepo_step
(In a step, hints (6-7) run right after the reward (2), before the advantages are computed.)

Deliberate differences from the authors' code, each with its reason:
  * Trigger per group, accept per sample: only groups with no correct rollout get hints,
    and each correct hinted sample is kept on its own. The authors trigger the whole
    device batch when any group is all-zero and accept a try only if every hinted sample
    on the device is correct, which wastes correct samples and hints easy prompts.
  * Trigger on accuracy (`cliff_trigger="accuracy"`): the learning cliff is "no rollout is
    correct"; the authors' "total reward all zero" also needs the format to fail, which a
    format-trained model rarely does. `cliff_trigger="reward"` restores theirs.
  * Replace without replacement, failed rollouts first: the authors draw slots with
    randint, so one slot can be overwritten twice and a correct rollout can be lost.
  * Empty gate gives exactly 0, not 0/0 = NaN.
  * The teacher runs only on gated rows (the authors run it on all rows and mask after):
    same loss, less compute.
  * tau is explicit: r = accuracy + format, so tau=1 admits a well-formatted wrong answer
    and tau=2 only correct, well-formatted ones.
  * format_reward rejects repeated or nested tags: the authors' regex accepts
    `<answer>A</answer><answer>B</answer>`, which lets a policy hedge across answers.
  * accuracy_reward reads the option letter in the last <answer> tag and accepts "(B)" and
    "B. cyst" (the authors use math_verify, then an exact string match): a letter is what a
    multiple-choice answer is, and the decoration around it carries no information.
  * Policy log-probs use the logits divided by the sampling temperature (as TRL does; the
    authors score raw logits): the ratio and gradient then belong to the distribution that
    was actually sampled.
  * The teacher's logits get the same suppressed ids masked as the student's (pad, BOS,
    image placeholders): both distributions in the JSD live on the tokens a policy may emit.
  * max_hint_tokens defaults to 64, where the authors allow the whole completion length:
    a hint is a sentence. A hint cut off before </hint> is no hint, so its group gets none.
Simplifications: one optimisation pass per batch (so old log-probs are the current ones
detached and the PPO ratio is 1, as in the authors' runs); one image per prompt; teacher
and student share the tokenizer and image processor (token-level divergence needs the same
vocabulary, as in GKD).

Supported input layouts. Everything takes `PromptBatch.vision`, the keyword arguments the
model's forward takes besides input_ids/attention_mask, and two places know their layout:
`index_vision` and `TOKEN_ALIGNED`. Supported: batch-first tensors with one image per prompt
(pixel_values [B, ...] indexed on dim 0, as in LLaVA, SmolVLM, Gemma 3 or PaliGemma) and
flattened patches regrouped with `image_grid_thw` (Qwen2-VL and its successors, PaddleOCR-VL),
with token-aligned kwargs such as mm_token_type_ids extended over the completion. test_kepo.py
runs LLaVA and Qwen2-VL here, and PaddleOCR-VL through train_small.py. Not supported: several
tiles per image stacked on dim 0 (InternVL or Aya Vision with more than one tile), whose
pixel_values are not batch-first, and Mllama's 4-D cross_attention_mask, which would have to
be extended over the completion as `generate` does. Checklist for a new family: build a
PromptBatch from its processor's output (everything but input_ids/attention_mask goes in
`vision`), check that `suppressed_ids` covers its image placeholder ids, and check that
`completion_logits` reproduces `generate`'s logits (test_kepo.py shows how).

Multi-GPU: each rank calls kepo_step on its own prompts, with the student wrapped in
DistributedDataParallel (DDP), or with student, teacher and reference sharded by FSDP2's
fully_shard when they do not fit one GPU (see `sharded`). The distillation term is normalised
by the gated tokens of all ranks, so the update equals one process's on the global batch
(both tested with torchrun).

Memory: the loss runs cfg.micro_batch_size rows at a time with exact gradient accumulation,
and the JSD JSD_CHUNK_TOKENS tokens at a time, so no fp32 [N, T, V] tensor is ever built.
Models may be bf16: log-softmax, the JSD and the policy loss are computed in fp32.
"""
import math
import re
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

METHODS = ("grpo", "opd", "kdpo", "kepo")
HINT_MODES = ("adaptive", "always")  # hints for cliff groups only, or for every group
CLIFF_TRIGGERS = ("accuracy", "reward")  # a cliff group has no correct rollout, or all rewards zero (the authors')
MAX_REWARD = 2.0  # r = accuracy + format


@dataclass
class KEPOConfig:
    """Hyperparameters of one KEPO step; defaults are the authors' released KEPO runs."""
    group_size: int = 8  # G: completions sampled per prompt
    temperature: float = 0.9  # sampling temperature of rollouts, hints and hinted samples
    top_p: float = 0.95  # nucleus sampling (top_k is always off)
    max_new_tokens: int = 1024  # completion length cap
    max_hint_tokens: int = 64  # cap on the teacher's hint length
    clip_eps: float = 0.2  # PPO clip range (inactive with one pass per batch: ratio is 1)
    beta_rl: float = 0.0  # weight of the k3 KL to a reference model (0: no reference needed)
    tau: float | None = 1.0  # quality gate r_i >= tau for distillation; None disables it
    beta_jsd: float = 0.5  # generalized JSD mixture: 0 forward KL, 1 reverse KL
    jsd_temperature: float = 1.0  # temperature of teacher and student logits in the JSD
    distill_coef: float = 1.0  # weight of the distillation loss in the total loss
    num_hinted: int = 2  # K: hinted samples kept (and rollouts replaced) per triggered group
    max_attempts: int = 5  # rejection-sampling tries per triggered group
    hint_mode: str = "adaptive"  # "adaptive": hints for cliff groups only; "always": every group
    cliff_trigger: str = "accuracy"  # cliff = no correct rollout ("accuracy") or all-zero reward ("reward")
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_size: int | None = None  # rows per forward and backward (exact gradient accumulation); None: all

    def __post_init__(self):
        """Refuse settings that would silently mean something else, naming the field."""
        checks = [
            ("group_size", self.group_size >= 2, "must be >= 2: advantages compare the samples of a group"),
            ("num_hinted", 1 <= self.num_hinted <= self.group_size, f"must be in [1, group_size={self.group_size}]"),
            ("beta_jsd", 0 <= self.beta_jsd <= 1, "must be in [0, 1]"),
            ("tau", self.tau is None or 0 <= self.tau <= MAX_REWARD, f"must be None or in [0, {MAX_REWARD:g}]"),
            ("hint_mode", self.hint_mode in HINT_MODES, f"must be one of {HINT_MODES}"),
            ("cliff_trigger", self.cliff_trigger in CLIFF_TRIGGERS, f"must be one of {CLIFF_TRIGGERS}"),
            ("temperature", self.temperature > 0, "must be > 0: rollouts are sampled"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_attempts", self.max_attempts >= 1, "must be >= 1"),
            ("max_new_tokens", min(self.max_new_tokens, self.max_hint_tokens) >= 1,
             "and max_hint_tokens must be >= 1"),
            ("beta_rl", self.beta_rl >= 0, "must be >= 0"),
            ("micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1, "must be None or >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"KEPOConfig.{name}={getattr(self, name)!r} {why}")


# ---- 1. Generation: G samples per prompt from the current student ------------------------------------------------
TOKEN_ALIGNED = ("mm_token_type_ids",)  # vision kwargs laid out like input_ids [B, P] (Qwen2-VL's image-token map)


def index_vision(vision: dict, index: torch.Tensor) -> dict:
    """Vision inputs of prompts `index` [M] (repeats allowed), as the model's forward takes them.

    Batch-first tensors ([B, ...]) are indexed on dim 0. Qwen2-VL style inputs hold the
    patches of all images in one pixel_values [sum_b t_b*h_b*w_b, D] with image_grid_thw
    [B, 3]; they are split per image and regrouped.
    """
    if "image_grid_thw" in vision:
        grid = vision["image_grid_thw"]
        patches = vision["pixel_values"].split(grid.prod(-1).tolist())
        rest = {k: v[index] for k, v in vision.items() if k not in ("pixel_values", "image_grid_thw")}
        return {**rest, "pixel_values": torch.cat([patches[i] for i in index.tolist()]),
                "image_grid_thw": grid[index]}
    return {k: v[index] for k, v in vision.items()}


@dataclass
class PromptBatch:
    """B tokenized prompts, left-padded, with their vision inputs."""
    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    vision: dict = field(default_factory=dict)  # model forward kwargs, e.g. pixel_values [B, 3, H, W]

    def select(self, index) -> "PromptBatch":
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return PromptBatch(self.input_ids[index], self.attention_mask[index], index_vision(self.vision, index))


@dataclass
class Rollouts:
    """N = B*G sampled completions; row i belongs to prompt i // G (groups are consecutive)."""
    prompts: PromptBatch  # the prompt of every row: input_ids [N, P]
    completion_ids: torch.Tensor  # [N, T], pad after the first EOS
    completion_mask: torch.Tensor  # [N, T], 1 up to and including the first EOS
    texts: list[str]  # N decoded completions

    def select(self, index) -> "Rollouts":
        index = torch.as_tensor(index, dtype=torch.long, device=self.completion_ids.device)
        return Rollouts(self.prompts.select(index), self.completion_ids[index],
                        self.completion_mask[index], [self.texts[i] for i in index.tolist()])


def suppressed_ids(tokenizer, model) -> list[int]:
    """Token ids a policy must never sample: pad, BOS, UNK and the vision placeholders.

    A sampled image token breaks the next forward with pixel_values; the same ids are masked
    when scoring so that sampling and scoring use one distribution. EOS is never suppressed
    (some tokenizers use it as pad).
    """
    names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    ids |= {getattr(model.config, name, None) for name in names}
    return sorted(ids - {None, tokenizer.eos_token_id})


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[N, T] int mask: 1 up to and including the first EOS, all ones if there is none.

    `generate` pads after EOS with pad_token_id, which may equal EOS, so `!= pad` is wrong.
    """
    is_eos = completion_ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    return (torch.arange(completion_ids.shape[1], device=completion_ids.device) <= first[:, None]).int()


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def sharded(model) -> bool:
    """Is `model` sharded over processes with FSDP2 (torch.distributed.fsdp.fully_shard)?

    The one place this file looks at sharding. A sharded model's forward gathers its weights
    from every rank, so every rank must run the same forwards in the same order: `generate`
    runs with synced_gpus (a rank that finishes early keeps stepping until all have), and where
    a step's data would skip a teacher forward or a `generate` call on one rank only (no cliff
    group, an empty gate, every hinted prompt done), that rank runs it on a stand-in row and
    drops the result (`on_any_rank` tells when).
    """
    return world_size() > 1 and isinstance(model, FSDPModule)


def on_any_rank(flag: bool, *models) -> bool:
    """`flag` on this rank, or, when one of `models` is sharded, whether it holds on any rank (a collective)."""
    shards = [m for m in models if m is not None and sharded(m)]
    if not shards:
        return flag
    any_flag = torch.tensor(float(flag), device=next(shards[0].parameters()).device)
    torch.distributed.all_reduce(any_flag, op=torch.distributed.ReduceOp.MAX)
    return bool(any_flag.item())


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: PromptBatch, group_size: int, *, temperature: float,
                      top_p: float = 1.0, max_new_tokens: int, suppress: list[int] = ()) -> Rollouts:
    """Sample `group_size` completions per prompt with `model.generate`; temperature 0 is greedy.

    Returns Rollouts with N = B*group_size rows, prompts repeated in place (row i -> prompt i // G).
    """
    rows = prompts.select(torch.arange(len(prompts.input_ids)).repeat_interleave(group_size))
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    out = model.generate(input_ids=rows.input_ids, attention_mask=rows.attention_mask, **rows.vision,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, suppress_tokens=list(suppress) or None,
                         synced_gpus=sharded(model), **sampling)
    ids = out[:, rows.input_ids.shape[1]:]
    mask = completion_mask(ids, tokenizer.eos_token_id)
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollouts(rows, ids, mask, tokenizer.batch_decode(ids, skip_special_tokens=True))


def completion_logits(model, rollouts: Rollouts, suppress: list[int] = ()) -> torch.Tensor:
    """[N, T, V] logits that predict each completion token (position t predicts token t).

    One forward over prompt + completion; `logits_to_keep` drops the prompt's logits.
    Token-aligned vision kwargs are extended with zeros (text) over the completion, as
    `generate` does. Suppressed ids get a large negative logit, not -inf: a full-vocabulary
    KL multiplies p * (log p - log q), and 0 * (-inf + inf) is NaN.
    """
    p, t = rollouts.prompts.input_ids, rollouts.completion_ids
    vision = {k: torch.cat([v, v.new_zeros(len(v), t.shape[1])], 1) if k in TOKEN_ALIGNED else v
              for k, v in rollouts.prompts.vision.items()}
    out = model(input_ids=torch.cat([p, t], 1),
                attention_mask=torch.cat([rollouts.prompts.attention_mask, rollouts.completion_mask], 1),
                **vision, logits_to_keep=t.shape[1] + 1, use_cache=False)
    logits = out.logits[:, :-1]
    if suppress:
        logits = logits.index_fill(-1, torch.tensor(list(suppress), device=logits.device), -1e9)
    return logits


def selective_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, T] log pi(ids | prefix) from logits [N, T, V] (any dtype), in fp32 one row at a time.

    The forward keeps only the gathered values; autograd still saves each row's fp32
    log_softmax for backward, which is why kepo_backward runs cfg.micro_batch_size rows at a time.
    """
    return torch.stack([(row.float() / temperature).log_softmax(-1).gather(-1, i[:, None]).squeeze(-1)
                        for row, i in zip(logits, ids)])


# ---- 2. Reward: r = accuracy + format, each 0 or 1 ---------------------------------------------------------------
_TAG = r"</?(?:think|answer)>"
_FREE = rf"(?:(?!{_TAG}).)*"  # text without think/answer tags: rejects nested or repeated tags
FORMAT_RE = re.compile(rf"\s*<think>{_FREE}</think>\s*<answer>{_FREE}</answer>\s*", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
LETTER_RE = re.compile(r"\s*\(?([A-Za-z])\)?(?![A-Za-z])")


def format_reward(completions: list[str]) -> torch.Tensor:
    """[N] 1.0 iff the whole text is <think>...</think> <answer>...</answer> (outer whitespace ok)."""
    return torch.tensor([float(FORMAT_RE.fullmatch(c) is not None) for c in completions])


def accuracy_reward(completions: list[str], answers: list[str]) -> torch.Tensor:
    """[N] 1.0 iff the option letter in the last <answer> tag equals the answer letter.

    Case and surrounding space are ignored; "B", "(B)" and "B. pneumonia" all read as B.
    No tag, an empty tag or a word instead of a letter scores 0.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    scores = []
    for text, answer in zip(completions, answers):
        tags = ANSWER_RE.findall(text)
        letter = LETTER_RE.match(tags[-1]) if tags else None
        scores.append(float(letter is not None and letter.group(1).upper() == answer.strip().upper()))
    return torch.tensor(scores)


def kepo_reward(completions: list[str], answers: list[str]) -> torch.Tensor:
    """[N] r = accuracy + format, in {0, 1, 2}."""
    return accuracy_reward(completions, answers) + format_reward(completions)


# ---- 3. GRPO: group-relative advantages and the clipped policy-gradient loss -------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[N] A_i = (r_i - mean_g) / (std_g + eps), unbiased std over consecutive groups of G.

    An all-equal group gives exactly 0 (std 0, numerator 0): the learning cliff.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need group_size >= 2 dividing {rewards.numel()} rewards, got {group_size}")
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def masked_mean_per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[] mean over sequences of each sequence's token mean; values, mask [N, T]."""
    mask = mask.to(values.dtype)
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """[N, T] per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 >= 0, d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """[] clipped PPO surrogate (+ beta * k3 KL to a reference), token mean per sequence, then mean.

    logps, old_logps, ref_logps, mask: [N, T]; advantages: [N]. With one pass per batch
    old_logps = logps.detach(), the ratio is 1 and the gradient is -A_i * grad log pi.
    """
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if ref_logps is not None and beta != 0:
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    return masked_mean_per_sequence(per_token, mask)


# ---- 4. Quality gate: distil only from trajectories with r_i >= tau ----------------------------------------------
def quality_gate(rewards: torch.Tensor, tau: float | None) -> torch.Tensor:
    """[N] bool, r_i >= tau. tau=None: all False (plain GRPO); tau=0: all True (uniform OPD)."""
    if tau is None:
        return torch.zeros_like(rewards, dtype=torch.bool)
    return rewards >= tau


# ---- 5. Token-level teacher divergence: the generalized JSD of GKD (arXiv 2306.13649), on-policy -----------------
JSD_CHUNK_TOKENS = 64  # tokens per JSD chunk: its fp32 [64, V] temporaries are recomputed in backward, not kept


def jsd_token_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                  temperature: float) -> torch.Tensor:
    """[] generalized JSD summed over tokens; logits [M, V] (any dtype), the maths in fp32.

    With M = beta p_T + (1-beta) p_S: JSD = beta KL(p_T || M) + (1-beta) KL(p_S || M);
    beta=0 is KL(p_T || p_S) (forward), beta=1 is KL(p_S || p_T) (reverse), the GKD / TRL convention.
    """
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    # F.kl_div(input, target) is KL(target || input), the reverse of the maths' argument order:
    # F.kl_div(s, t) below is KL(p_T || p_S), and F.kl_div(m, t) is KL(p_T || M)
    if beta == 0:
        return F.kl_div(s, t, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(t, s, reduction="sum", log_target=True)
    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))  # log M, without stacking two [M, V]
    return (beta * F.kl_div(m, t, reduction="sum", log_target=True)
            + (1 - beta) * F.kl_div(m, s, reduction="sum", log_target=True))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """[] generalized JSD (see jsd_token_sum) summed over masked tokens / their count (0.0 for an empty mask).

    Logits [N, T, V], mask [N, T]. Only the masked tokens are taken, JSD_CHUNK_TOKENS at a
    time under activation checkpointing, so memory beyond the logits themselves does not grow
    with N or T (the fp32 [N, T, V] tensors of a direct computation are 20 GB at
    N=64, T=512, V=151,936).
    """
    keep = mask.bool()
    s, t = student_logits[keep], teacher_logits[keep]  # [M, V]
    if len(s) == 0:
        return student_logits.sum() * 0.0
    total = sum(checkpoint(jsd_token_sum, s_chunk, t_chunk, beta, temperature, use_reentrant=False)
                for s_chunk, t_chunk in zip(s.split(JSD_CHUNK_TOKENS), t.split(JSD_CHUNK_TOKENS)))
    return total / len(s)


def data_parallel_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the data-parallel ranks (x itself in a single process)."""
    if world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def gated_tokens(rollouts: Rollouts, gate: torch.Tensor) -> torch.Tensor:
    """[] completion tokens of the gated rows (gate [N] bool), summed over data-parallel ranks.

    A collective under torch.distributed: every rank calls it, gated rows or not.
    """
    return data_parallel_sum(rollouts.completion_mask[gate].sum().float())


def distillation_loss(student_logits: torch.Tensor, teacher, rollouts: Rollouts, gate: torch.Tensor,
                      cfg: KEPOConfig, all_tokens: torch.Tensor, suppress: list[int] = ()) -> torch.Tensor:
    """[] this batch's gated JSD token sum / all_tokens; the teacher (no grad) scores only the gated rows.

    student_logits: [N, T, V] from completion_logits; gate: [N] bool; all_tokens: the
    `gated_tokens` of the whole step, so micro-batches and ranks add up to one token mean
    over the global batch. An empty gate is an exact, differentiable 0 and costs no teacher forward
    (when sharded: unless another rank gates rows, then this rank runs a stand-in row).
    """
    rows = gate.nonzero().squeeze(1)
    if not on_any_rank(rows.numel() > 0, teacher):  # nothing gated (on any rank, when sharded): no teacher forward
        return student_logits.sum() * 0.0
    with torch.no_grad():  # a rank with nothing gated runs a stand-in row for a sharded teacher (see `sharded`)
        teacher_logits = completion_logits(teacher, rollouts.select(rows if rows.numel() else [0]), suppress)
    if rows.numel() == 0:
        return student_logits.sum() * 0.0
    mask = rollouts.completion_mask[rows]
    jsd = generalized_jsd(student_logits[rows], teacher_logits, mask, cfg.beta_jsd, cfg.jsd_temperature)
    # DDP and FSDP average gradients over ranks, hence the factor world_size: the average of the ranks'
    # token sums / all_tokens * world is the token mean over the global batch
    return jsd * mask.sum() * world_size() / all_tokens


# ---- 6. Hint learning: the teacher writes a hint from the ground truth -------------------------------------------
HINT_RE = re.compile(r"<hint>(.*?)</hint>", re.S)


def extract_hint(text: str) -> str | None:
    """The text of the first <hint>...</hint>, stripped; None when absent or empty."""
    match = HINT_RE.search(text)
    return (match.group(1).strip() or None) if match else None


@dataclass
class HintPrompts:
    """The two data-specific prompt builders that hints need; the caller supplies them.

    `request(prompts)`: teacher prompts (image, question and ground-truth answer) asking for
    a <hint>, for these indices of the step's PromptBatch. `hinted(prompts, hints)`: student
    prompts for the same question with the hint (the authors' "v1" also shows the answer).
    """
    request: Callable[[list[int]], PromptBatch]
    hinted: Callable[[list[int], list[str]], PromptBatch]


@torch.no_grad()
def write_hints(teacher, tokenizer, requests: PromptBatch, cfg: KEPOConfig,
                suppress: list[int] = ()) -> list[str | None]:
    """One sampled hint per request (sampled like the rollouts); None where none was written."""
    out = generate_rollouts(teacher, tokenizer, requests, 1, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_hint_tokens, suppress=suppress)
    return [extract_hint(t) for t in out.texts]


# ---- 7. Rejection sampling and injection: correct hinted samples join the hint-free group ------------------------
def tries_per_call(device: torch.device, max_attempts: int) -> int:
    """Rejection-sampling tries batched into one `generate` call: all of them on an accelerator,
    where generation is bound by per-token overhead and 5x the rows cost about one try; one on
    a CPU, whose cost grows with the rows (measured there: all-in-one took 94 ms a step, one at a time 84 ms)."""
    return 1 if torch.device(device).type == "cpu" else max_attempts


def rejection_sample(student, tokenizer, hinted: PromptBatch, answers: list[str], cfg: KEPOConfig,
                     suppress: list[int] = ()) -> list[list[tuple[torch.Tensor, str]]]:
    """Up to K = cfg.num_hinted correct (ids [L], text) samples per hinted prompt.

    The paper's loop: up to cfg.max_attempts tries of K samples for every prompt still short
    of K, each correct sample kept on its own (per-sample acceptance). A `generate` call
    draws `tries_per_call` tries at once, and the first correct samples in sampling order are
    kept: the ones the tries, made in turn, would keep.
    """
    k, accepted = cfg.num_hinted, [[] for _ in answers]
    per_call = tries_per_call(hinted.input_ids.device, cfg.max_attempts)
    for first in range(0, cfg.max_attempts, per_call):
        todo = [i for i, acc in enumerate(accepted) if len(acc) < k]
        if not on_any_rank(bool(todo), student):
            break
        todo = todo or [0]  # a stand-in where a sharded student's other ranks still sample; it has K already
        n = k * min(per_call, cfg.max_attempts - first)  # samples per prompt in this call
        out = generate_rollouts(student, tokenizer, hinted.select(todo), n, temperature=cfg.temperature,
                                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, suppress=suppress)
        correct = accuracy_reward(out.texts, [answers[i] for i in todo for _ in range(n)])
        for row in correct.nonzero().squeeze(1).tolist():  # rows in sampling order
            i = todo[row // n]
            if len(accepted[i]) < k:
                accepted[i].append((out.completion_ids[row][out.completion_mask[row].bool()], out.texts[row]))
    return accepted


def inject(rollouts: Rollouts, rewards: torch.Tensor, group_size: int,
           accepted: dict[int, list[tuple[torch.Tensor, str]]], pad_id: int) -> Rollouts:
    """Replace rollouts of group g by accepted[g], keeping each row's hint-free prompt.

    rewards [N] choose the slots: distinct rows, lowest reward (failed) first. No importance
    weight: injected samples are treated as samples of pi_theta(.|x), as in the paper.
    """
    seqs = [ids[m.bool()] for ids, m in zip(rollouts.completion_ids, rollouts.completion_mask)]
    texts = list(rollouts.texts)
    for g, samples in accepted.items():
        slots = g * group_size + torch.argsort(rewards[g * group_size:(g + 1) * group_size], stable=True)
        for slot, (ids, text) in zip(slots.tolist(), samples):
            seqs[slot], texts[slot] = ids, text
    ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(s, dtype=torch.int) for s in seqs], batch_first=True)
    return replace(rollouts, completion_ids=ids, completion_mask=mask, texts=texts)


def cliff_groups(accuracy: torch.Tensor, rewards: torch.Tensor, group_size: int, trigger: str) -> list[int]:
    """Indices of groups on the learning cliff: no correct rollout ("accuracy") or all-zero reward ("reward")."""
    signal = {"accuracy": accuracy, "reward": rewards}[trigger]
    return (signal.view(-1, group_size).amax(1) == 0).nonzero().squeeze(1).tolist()


def knowledge_enhance(student, teacher, tokenizer, rollouts: Rollouts, rewards: torch.Tensor, answers: list[str],
                      groups: list[int], hint_prompts: HintPrompts, cfg: KEPOConfig,
                      suppress: list[int] = ()) -> tuple[Rollouts, dict]:
    """Hints for `groups`, rejection sampling, injection. answers: [B] one per prompt.

    Returns the new rollouts and hint statistics (triggered groups, groups that received at
    least one correct hinted sample, samples injected).
    """
    # A rank with no group (or no hint) where sharded models run on other ranks works on group 0 as
    # a stand-in and keeps nothing of it: zip() below stops at the real groups (see `sharded`)
    hints = write_hints(teacher, tokenizer, hint_prompts.request(groups or [0]), cfg, suppress)
    with_hint = [(g, h) for g, h in zip(groups, hints) if h is not None]
    gs, hs = [g for g, _ in with_hint], [h for _, h in with_hint]
    accepted = {}
    if on_any_rank(bool(gs), student):
        samples = rejection_sample(student, tokenizer, hint_prompts.hinted(gs or [0], hs or [""]),
                                   [answers[g] for g in gs or [0]], cfg, suppress)
        accepted = {g: s for g, s in zip(gs, samples) if s}
    stats = {"hint_groups": len(groups), "hint_written": len(with_hint),
             "hint_accept_rate": len(accepted) / max(len(groups), 1),
             "hint_injected": sum(len(s) for s in accepted.values())}
    return inject(rollouts, rewards, cfg.group_size, accepted, tokenizer.pad_token_id), stats


# ---- 8. Loss and step: eq. 7, policy loss + gated distillation, one optimizer step -------------------------------
@contextmanager
def timed(metrics: dict, key: str, device):
    """Adds the wall time of the block to metrics[key] (after the device's queued work finishes)."""
    def clock():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    start = clock()
    yield
    metrics[key] = metrics.get(key, 0.0) + clock() - start


def reference_logps(ref_model, rollouts: Rollouts, logps: torch.Tensor, cfg: KEPOConfig,
                    suppress: list[int] = ()) -> torch.Tensor | None:
    """[N, T] log pi_ref of the completions (no grad), or None without a reference model.

    Outside the completion mask they are set equal to the student's: the pad positions hold
    suppressed ids whose log-probs sit near -1e9, where float32 steps are 128 apart, so
    ref - logp there could be +-128 and exp(128) = inf; inf * (mask 0) would be NaN.
    """
    if ref_model is None:
        return None
    with torch.no_grad():
        ref = selective_logps(completion_logits(ref_model, rollouts, suppress), rollouts.completion_ids,
                              cfg.temperature)
    return torch.where(rollouts.completion_mask.bool(), ref, logps.detach())


def method_tau(method: str, cfg: KEPOConfig) -> float | None:
    """The quality gate's threshold per method: grpo none, opd every rollout (r >= 0), kdpo/kepo cfg.tau."""
    return {"grpo": None, "opd": 0.0}.get(method, cfg.tau)


def micro_batches(n: int, size: int | None, device) -> tuple[torch.Tensor, ...]:
    """Row indices [m] of consecutive chunks of `size` rows covering 0..n-1 (one chunk if size is None)."""
    return torch.arange(n, device=device).split(size or n)


def micro_batch_loss(student, teacher, rollouts: Rollouts, advantages: torch.Tensor, gate: torch.Tensor,
                     method: str, cfg: KEPOConfig, n: int, all_tokens: torch.Tensor, ref_model=None,
                     suppress: list[int] = ()) -> tuple[torch.Tensor, dict]:
    """[] the share of eq. 7's loss carried by m of the step's n rows (advantages, gate: [m]), and its parts.

    Sequence terms are weighted m / n and JSD tokens divided by the step's gated tokens, so
    the micro-batches' losses (and gradients) add up to the loss of the whole batch.
    """
    logits = completion_logits(student, rollouts, suppress)
    logps = selective_logps(logits, rollouts.completion_ids, cfg.temperature)
    mask, share, parts = rollouts.completion_mask, len(advantages) / n, {}
    ref_logps = reference_logps(ref_model, rollouts, logps, cfg, suppress)
    if method == "opd":
        policy = logits.new_zeros(())
    else:
        policy = share * policy_loss(logps, logps.detach(), advantages, mask, cfg.clip_eps, ref_logps, cfg.beta_rl)
    with timed(parts, "time/teacher", logits.device):
        distill = distillation_loss(logits, teacher, rollouts, gate, cfg, all_tokens, suppress)
    loss = policy + cfg.distill_coef * distill  # eq. 7, negated: J is maximised, the loss minimised
    parts.update(loss=loss.item(), policy_loss=policy.item(), distill_loss=distill.item())
    if ref_logps is not None:
        parts["kl"] = share * masked_mean_per_sequence(k3_kl(logps.detach(), ref_logps), mask).item()
    return loss, parts


def kepo_backward(student, teacher, rollouts: Rollouts, rewards: torch.Tensor, method: str, cfg: KEPOConfig,
                  ref_model=None, suppress: list[int] = ()) -> dict:
    """Accumulate the gradient of eq. 7's loss for `method` on scored rollouts (rewards [N]); returns its parts.

    loss = policy_loss + distill_coef * gated JSD; opd has no policy term (GKD: the JSD alone),
    grpo's gate is empty (its distillation term is an exact 0 and runs no teacher). Forward
    and backward run cfg.micro_batch_size rows at a time, so the [m, T, V] logits of one
    micro-batch are alive at once; the gradient equals the one of a single pass over N rows.
    """
    advantages = group_advantages(rewards, cfg.group_size)  # needs whole groups: computed before chunking
    gate = quality_gate(rewards, method_tau(method, cfg))
    all_tokens = gated_tokens(rollouts, gate)
    chunks, totals = micro_batches(len(rewards), cfg.micro_batch_size, rewards.device), {}
    ddp = isinstance(student, torch.nn.parallel.DistributedDataParallel)
    for k, rows in enumerate(chunks):
        last = k == len(chunks) - 1
        # DDP all-reduces after the last chunk; FSDP reduce-scatters each chunk's gradients into the shards
        with nullcontext() if last or not ddp else student.no_sync():
            loss, parts = micro_batch_loss(student, teacher, rollouts.select(rows), advantages[rows], gate[rows],
                                           method, cfg, len(rewards), all_tokens, ref_model, suppress)
            loss.backward()
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
    return {**totals, "gate_frac": gate.float().mean().item()}


def check_step_inputs(method: str, teacher, ref_model, hint_prompts, cfg: KEPOConfig, prompts: PromptBatch,
                      answers: list[str]):
    """Raise before any sampling if the step cannot run as asked."""
    if method not in METHODS or (method != "grpo" and teacher is None) or (method == "kepo" and hint_prompts is None):
        raise ValueError(f"method must be one of {METHODS}; opd/kdpo/kepo need a teacher, kepo needs hint_prompts")
    if cfg.beta_rl > 0 and ref_model is None:
        raise ValueError(f"beta_rl={cfg.beta_rl} needs a ref_model (the KL term is to a reference policy)")
    if len(answers) != len(prompts.input_ids):
        raise ValueError(f"{len(prompts.input_ids)} prompts but {len(answers)} answers")


def kepo_step(student, optimizer, tokenizer, prompts: PromptBatch, answers: list[str], cfg: KEPOConfig,
              method: str = "kepo", teacher=None, ref_model=None, hint_prompts: HintPrompts | None = None) -> dict:
    """One training step on B prompts (answers: [B] letters); returns metrics (TRL names where they exist).

    Sample G rollouts per prompt, score them, (kepo) enhance cliff groups with hints, then
    the loss of eq. 7 on the (injected) rollouts with rewards recomputed, one clipped optimizer step.
    Multi-GPU: give every rank its own B prompts (the same B on each), with the student in
    DistributedDataParallel (sampling uses the bare module, the loss the wrapper) or all
    models sharded with fully_shard; the update equals a single process's on the global batch.
    """
    check_step_inputs(method, teacher, ref_model, hint_prompts, cfg, prompts, answers)
    policy = student.module if isinstance(student, torch.nn.parallel.DistributedDataParallel) else student
    dev, g, suppress, metrics = prompts.input_ids.device, cfg.group_size, suppressed_ids(tokenizer, policy), {}
    row_answers = [a for a in answers for _ in range(g)]
    with timed(metrics, "time/generate", dev):
        rollouts = generate_rollouts(policy, tokenizer, prompts, g, temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens, suppress=suppress)
        acc, fmt = accuracy_reward(rollouts.texts, row_answers), format_reward(rollouts.texts)
    cliff = cliff_groups(acc, acc + fmt, g, cfg.cliff_trigger)
    metrics.update(sample_accuracy=acc.mean().item(), sample_format=fmt.mean().item(),
                   cliff_groups=len(cliff) / len(answers))
    with timed(metrics, "time/hints", dev):
        groups = cliff if cfg.hint_mode == "adaptive" else list(range(len(answers)))
        if method == "kepo" and on_any_rank(bool(groups), policy, teacher):
            rollouts, stats = knowledge_enhance(policy, teacher, tokenizer, rollouts, acc + fmt, answers,
                                                groups, hint_prompts, cfg, suppress)
            metrics.update(stats)
        rewards = kepo_reward(rollouts.texts, row_answers).to(dev)  # recomputed: injected rows are correct
    with timed(metrics, "time/loss_backward", dev):
        optimizer.zero_grad(set_to_none=True)
        parts = kepo_backward(student, teacher, rollouts, rewards, method, cfg, ref_model, suppress)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
    stds = rewards.view(-1, g).std(1)
    metrics.update(parts, grad_norm=grad_norm.item(), reward=rewards.mean().item(),
                   reward_std=stds.mean().item(), frac_reward_zero_std=(stds == 0).float().mean().item(),
                   **{"completions/mean_length": rollouts.completion_mask.sum(1).float().mean().item()})
    return metrics
