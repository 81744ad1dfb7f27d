"""Tests for kepo.py (in its section order: math against independent computations, KEPO's own rules on a
scripted policy, steps on tiny Hugging Face VLMs) and for train_small.py."""
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import kepo
import train_small as ts


# ---- Test helpers: a tiny Hugging Face VLM, a scripted policy, independent formulas ------------------------------
WORDS = "what finding is shown options a b c d look at lesion large small round answer hint".split()


TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]


N_IMG = 4  # image tokens per prompt: a 16x16 image in 8x8 patches


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    return ts.word_tokenizer(WORDS, ["<image>"], "<image>")


def tiny_vlm(tok, hidden=32, seed=0, vocab=None):
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    text = Qwen2Config(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=N_IMG, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(cfg)


def prompt_batch(tok, texts, seed=0, device="cpu"):
    enc = tok(["<image> " * N_IMG + t for t in texts], return_tensors="pt", padding=True)
    pv = torch.randn(len(texts), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return on(kepo.PromptBatch(enc.input_ids, enc.attention_mask, {"pixel_values": pv}), device)


def on(batch: kepo.PromptBatch, device) -> kepo.PromptBatch:
    return kepo.PromptBatch(batch.input_ids.to(device), batch.attention_mask.to(device),
                            {k: v.to(device) for k, v in batch.vision.items()})


# the GPU cases run where CUDA is present (they were run on an H200, see README) and are skipped elsewhere
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


ATOL = {"cpu": 1e-5, "cuda": 1e-4}  # cuDNN may pick TF32 convolutions for the patch embedding


def make_rollouts(completions):
    """Rollouts with distinct prompt ids per row, completions given as lists of ids."""
    n = len(completions)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in completions], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c), dtype=torch.int) for c in completions],
                                           batch_first=True)
    prompts = kepo.PromptBatch(torch.arange(n)[:, None] + 100, torch.ones(n, 1, dtype=torch.long),
                               {"pixel_values": torch.arange(n).float()[:, None]})
    return kepo.Rollouts(prompts, ids, mask, [f"t{i}" for i in range(n)])


class ScriptedVLM(torch.nn.Module):
    """A tiny LLaVA for every forward pass, whose `generate` writes rule(row_index, prompt_ids) instead of sampling.

    Records the batch size of every forward and generate call, so tests can count teacher work.
    """

    def __init__(self, tok, rule, hidden=32, seed=0, logit_offset=0.0):
        super().__init__()
        self.model, self.tok, self.rule, self.calls = tiny_vlm(tok, hidden, seed), tok, rule, []
        self.config, self.logit_offset = self.model.config, logit_offset

    def forward(self, **kwargs):
        self.calls.append(("forward", len(kwargs["input_ids"])))
        out = self.model(**kwargs)
        out.logits = out.logits + self.logit_offset  # the same distribution: softmax ignores a constant
        return out

    def generate(self, input_ids, **kwargs):
        self.calls.append(("generate", len(input_ids)))
        texts = [self.rule(i, row) for i, row in enumerate(input_ids.tolist())]
        seqs = [torch.tensor(self.tok(t).input_ids + [self.tok.eos_token_id]) for t in texts]
        return torch.cat([input_ids, pad_sequence(seqs, batch_first=True, padding_value=self.tok.pad_token_id)], 1)


def answer(letter):
    return f"<think> look </think> <answer> {letter} </answer>"


def hinted_student(tok, wrong="c"):
    """Answers right (the letter after "answer" in the v1 hinted prompt) with a hint, `wrong` without one."""
    hint_id, answer_id = tok.convert_tokens_to_ids("hint"), tok.convert_tokens_to_ids("answer")
    return lambda i, row: answer(tok.decode(row[row.index(answer_id) + 1])) if hint_id in row else answer(wrong)


def scripted_setup(tok, answers=("b", "a"), teacher_rule=lambda i, row: "<hint> look at lesion </hint>", **cfg):
    student, teacher = ScriptedVLM(tok, hinted_student(tok)), ScriptedVLM(tok, teacher_rule, hidden=48, seed=1)
    prompts = prompt_batch(tok, ["what is shown"] * len(answers))
    hints = kepo.HintPrompts(request=prompts.select,
                             hinted=lambda idx, h: prompt_batch(tok, [f"hint {x} answer {answers[i]}"
                                                                      for i, x in zip(idx, h)]))
    config = kepo.KEPOConfig(**{"group_size": 4, "max_new_tokens": 8, "num_hinted": 2, "max_attempts": 1, **cfg})
    return student, teacher, prompts, hints, config


def step_setup(tokenizer, device="cpu", **cfg):
    student, teacher = tiny_vlm(tokenizer, 32, seed=0).to(device), tiny_vlm(tokenizer, 48, seed=1).to(device)
    prompts = prompt_batch(tokenizer, ["what finding is shown options a b", "what is shown options a b"],
                           device=device)
    config = kepo.KEPOConfig(**{"group_size": 4, "max_new_tokens": 6, "max_hint_tokens": 6, "max_attempts": 2,
                                **cfg})
    hint_prompts = kepo.HintPrompts(
        request=lambda idx: prompts.select(idx),
        hinted=lambda idx, hints: prompt_batch(tokenizer, [f"hint {h} what is shown" for h in hints], device=device))
    return student, teacher, prompts, config, hint_prompts


def tiny_qwen2_vl(seed=0, device="cpu"):
    """A Qwen2-VL (flattened patches + image_grid_thw + mm_token_type_ids) and inputs built by hand."""
    import transformers
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    # the PIL image processor (no torchvision) is Qwen2VLImageProcessorPil from transformers 5.4 on
    image_processor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    from PIL import Image
    tok = ts.word_tokenizer(WORDS, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"], "<|image_pad|>")
    vocab = tok.get_vocab()
    image_id = vocab["<|image_pad|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=image_id, video_token_id=3,
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"]))
    try:
        processor = image_processor(min_pixels=56 * 56, max_pixels=56 * 56)
    except ImportError as e:  # transformers 5.4 asks for torchvision even for the PIL processor
        pytest.skip(f"this transformers cannot build a Qwen2-VL image processor: {str(e).strip()[:80]}")
    images = processor([Image.new("RGB", (56, 56), (i * 90, 30, 30)) for i in range(2)], return_tensors="pt")
    n_image = (images["image_grid_thw"].prod(-1) // 4).tolist()  # 2x2 patches merge into one token
    texts = [f"<|vision_start|> {' '.join(['<|image_pad|>'] * n)} <|vision_end|> {q}"
             for n, q in zip(n_image, ["what finding is shown options a b", "what is shown"])]
    enc = tok(texts, return_tensors="pt", padding=True)
    vis = {"pixel_values": images["pixel_values"], "image_grid_thw": images["image_grid_thw"],
           "mm_token_type_ids": (enc.input_ids == image_id).long()}
    return model.to(device), tok, on(kepo.PromptBatch(enc.input_ids, enc.attention_mask, vis), device)


def hand_jsd(s_logits, t_logits, beta, temperature):
    """Per-token generalized JSD from probabilities, written independently of kepo.py."""
    p_s = torch.softmax(s_logits.double() / temperature, -1)
    p_t = torch.softmax(t_logits.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)



# ---- 1. Generation: G samples per prompt from the current student ------------------------------------------------
def test_completion_mask_stops_at_first_eos():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    assert kepo.completion_mask(ids, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5]


def test_index_vision_batch_first_and_grid():
    pv = torch.arange(3)[:, None, None, None].expand(3, 3, 2, 2).float()
    out = kepo.index_vision({"pixel_values": pv}, torch.tensor([2, 2, 0]))
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [2, 2, 0]
    grid = torch.tensor([[1, 2, 2], [1, 1, 2], [1, 2, 1]])  # 4, 2 and 2 patches
    patches = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]).float()[:, None]
    out = kepo.index_vision({"pixel_values": patches, "image_grid_thw": grid}, torch.tensor([1, 1, 0]))
    assert out["pixel_values"].squeeze(1).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out["image_grid_thw"].tolist() == [[1, 1, 2], [1, 1, 2], [1, 2, 2]]


def test_generation_shapes_masks_and_logps(tokenizer):
    model = tiny_vlm(tokenizer)
    prompts = prompt_batch(tokenizer, ["what finding is shown", "what is shown options a b"])
    torch.manual_seed(1)
    r = kepo.generate_rollouts(model, tokenizer, prompts, 3, temperature=1.0, max_new_tokens=6,
                               suppress=kepo.suppressed_ids(tokenizer, model))
    n, t = r.completion_ids.shape
    assert n == 6 and t <= 6 and len(r.texts) == 6
    assert torch.equal(r.prompts.input_ids[0], r.prompts.input_ids[2])  # prompt 0 repeated in place
    assert torch.equal(r.prompts.vision["pixel_values"][3], prompts.vision["pixel_values"][1])
    assert torch.equal(r.completion_mask, kepo.completion_mask(r.completion_ids, tokenizer.eos_token_id))
    suppressed = kepo.suppressed_ids(tokenizer, model)
    assert tokenizer.convert_tokens_to_ids("<image>") in suppressed and tokenizer.eos_token_id not in suppressed
    assert not torch.isin(r.completion_ids[r.completion_mask.bool()], torch.tensor(suppressed)).any()
    # log-probs equal the model's own log-softmax over a plain forward, gathered by hand
    logps = kepo.selective_logps(kepo.completion_logits(model, r), r.completion_ids)
    full = torch.cat([r.prompts.input_ids, r.completion_ids], 1)
    att = torch.cat([r.prompts.attention_mask, r.completion_mask], 1)
    logits = model(input_ids=full, attention_mask=att, **r.prompts.vision).logits
    p = r.prompts.input_ids.shape[1]
    expected = logits[:, p - 1:-1].log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(logps, expected, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_reproduces_generate_logits_with_left_padding(tokenizer, device):
    model = tiny_vlm(tokenizer).to(device)
    prompts = prompt_batch(tokenizer, ["what finding is shown options a b c d look at", "what is shown"], device=device)
    assert (prompts.attention_mask == 0).any()  # one prompt is left-padded
    rows = prompts.select([0, 0, 1, 1])
    torch.manual_seed(0)
    out = model.generate(input_ids=rows.input_ids, attention_mask=rows.attention_mask, **rows.vision,
                         do_sample=True, top_k=0, max_new_tokens=5, min_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         suppress_tokens=kepo.suppressed_ids(tokenizer, model), output_logits=True,
                         return_dict_in_generate=True)
    ids = out.sequences[:, rows.input_ids.shape[1]:]
    r = kepo.Rollouts(rows, ids, torch.ones_like(ids, dtype=torch.int), [""] * 4)
    assert torch.allclose(kepo.completion_logits(model, r), torch.stack(out.logits, 1), atol=ATOL[device])


def test_greedy_generation_is_deterministic(tokenizer):
    model = tiny_vlm(tokenizer)
    prompts = prompt_batch(tokenizer, ["what finding is shown"])
    a = kepo.generate_rollouts(model, tokenizer, prompts, 2, temperature=0, max_new_tokens=5)
    b = kepo.generate_rollouts(model, tokenizer, prompts, 2, temperature=0, max_new_tokens=5)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts[0] == a.texts[1]


@pytest.mark.parametrize("device", DEVICES)
def test_qwen2_vl_flattened_patches_score_and_train(device):
    model, tok, prompts = tiny_qwen2_vl(device=device)
    assert prompts.vision["pixel_values"].shape[0] != len(prompts.input_ids)  # not batch-first
    rows = prompts.select([0, 0, 1, 1])
    torch.manual_seed(0)
    out = model.generate(input_ids=rows.input_ids, attention_mask=rows.attention_mask, **rows.vision,
                         do_sample=True, top_k=0, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, eos_token_id=2,
                         suppress_tokens=kepo.suppressed_ids(tok, model), output_logits=True,
                         return_dict_in_generate=True)
    ids = out.sequences[:, rows.input_ids.shape[1]:]
    r = kepo.Rollouts(rows, ids, torch.ones_like(ids, dtype=torch.int), [""] * 4)
    assert torch.allclose(kepo.completion_logits(model, r), torch.stack(out.logits, 1), atol=ATOL[device])
    teacher, _, _ = tiny_qwen2_vl(seed=1, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_hint_tokens=4, max_attempts=1, tau=0.0,
                          hint_mode="always")
    hints = kepo.HintPrompts(request=prompts.select, hinted=lambda idx, h: prompts.select(idx))
    m = kepo.kepo_step(model, torch.optim.SGD(model.parameters(), lr=0.5), tok, prompts, ["A", "B"], cfg,
                       method="kepo", teacher=teacher, hint_prompts=hints)
    assert math.isfinite(m["loss"]) and m["gate_frac"] == 1.0 and m["hint_groups"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- 2. Reward: r = accuracy + format, each 0 or 1 ---------------------------------------------------------------
REWARD_TABLE = [  # text, answer, format, accuracy
    ("<think>round lesion</think><answer>B</answer>", "B", 1, 1),
    ("  <think> x </think>\n<answer> b </answer>\n", "B", 1, 1),
    ("<think>x</think><answer>(C)</answer>", "C", 1, 1),
    ("<think>x</think><answer>C. cyst</answer>", "C", 1, 1),
    ("<think>x</think><answer>Cyst</answer>", "C", 1, 0),
    ("<think>x</think><answer>B</answer>", "A", 1, 0),
    ("<think>x</think><answer></answer>", "A", 1, 0),
    ("<answer>B</answer>", "B", 0, 1),
    ("<think>x</think>", "B", 0, 0),
    ("<think>x</think><answer>B</answer> trailing", "B", 0, 1),
    ("<think>x</think><answer>A</answer><answer>B</answer>", "B", 0, 1),
    ("<think><think>x</think></think><answer>B</answer>", "B", 0, 1),
    ("<think>x</think><answer>B", "B", 0, 0),
    ("", "A", 0, 0),
    ("\u00e9\u6f22\U0001f600<answer>\u00c4</answer>", "A", 0, 0),
    ("<think>\u6f22\u5b57</think><answer>D</answer>", "d", 1, 1),
]


@pytest.mark.parametrize("text,answer,fmt,acc", REWARD_TABLE)
def test_rewards_on_tricky_strings(text, answer, fmt, acc):
    assert kepo.format_reward([text]).item() == fmt
    assert kepo.accuracy_reward([text], [answer]).item() == acc
    assert kepo.kepo_reward([text], [answer]).item() == fmt + acc


def test_accuracy_reward_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        kepo.accuracy_reward(["a", "b"], ["A"])


# ---- 3. GRPO: group-relative advantages and the clipped policy-gradient loss -------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = kepo.group_advantages(r, 4)
    g1 = r[:4]
    mean, std = g1.mean().item(), math.sqrt(sum((x - g1.mean().item()) ** 2 for x in g1.tolist()) / 3)
    expected = [(x - mean) / (std + 1e-4) for x in g1.tolist()] + [0.0] * 4
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    assert (adv[4:] == 0).all()  # all-equal group: exactly zero, not NaN


@pytest.mark.parametrize("group_size", [1, 3])
def test_group_advantages_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        kepo.group_advantages(torch.zeros(8), group_size)


def test_policy_loss_at_ratio_one_value_and_gradient():
    logps = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.5, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss = kepo.policy_loss(logps, logps.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(loss, -adv.mean())  # ratio 1: each sequence's token mean is -A_i
    lengths = mask.sum(1, keepdim=True).float()
    assert torch.allclose(logps.grad, -adv[:, None] * mask / lengths / 3)


def test_policy_loss_clipping():
    old = torch.zeros(2, 2)
    logps = torch.full((2, 2), 0.5, requires_grad=True)  # ratio e^0.5 ~ 1.65 > 1 + eps
    adv = torch.tensor([1.0, -1.0])
    loss = kepo.policy_loss(logps, old, adv, torch.ones(2, 2), clip_eps=0.2)
    loss.backward()
    r = math.exp(0.5)
    assert math.isclose(loss.item(), (-1.2 + r) / 2, rel_tol=1e-6)  # A>0 clipped, A<0 not
    assert torch.allclose(logps.grad[0], torch.zeros(2))  # clipped: no gradient
    assert torch.allclose(logps.grad[1], torch.full((2,), r / 4))


def test_k3_kl_nonnegative_and_added_with_beta():
    logps, ref = torch.randn(4, 6), torch.randn(4, 6)
    k3 = kepo.k3_kl(logps, ref)
    assert (k3 >= 0).all() and kepo.k3_kl(ref, ref).abs().max() == 0
    mask, adv = torch.ones(4, 6), torch.zeros(4)
    loss = kepo.policy_loss(logps, logps, adv, mask, ref_logps=ref, beta=0.1)
    assert torch.allclose(loss, 0.1 * k3.mean())


def test_grpo_all_equal_rewards_give_zero_policy_gradient(tokenizer):
    # two new tokens cannot hold an <answer> tag: every reward is 0, every advantage 0
    student, _, prompts, cfg, _ = step_setup(tokenizer, max_new_tokens=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    torch.manual_seed(0)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["A", "B"], cfg, method="grpo")
    assert m["reward"] == 0 and m["frac_reward_zero_std"] == 1.0 and m["cliff_groups"] == 1.0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


# ---- 4. Quality gate: distil only from trajectories with r_i >= tau ----------------------------------------------
def test_quality_gate_edges():
    r = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert kepo.quality_gate(r, None).tolist() == [False] * 4
    assert kepo.quality_gate(r, 0.0).tolist() == [True] * 4
    assert kepo.quality_gate(r, 1.0).tolist() == [False, True, True, True]
    assert kepo.quality_gate(r, 2.0).tolist() == [False, False, True, False]


def test_empty_gate_gives_finite_zero_distillation(tokenizer):
    student, teacher, prompts, cfg, hints = step_setup(tokenizer, tau=2.0, max_new_tokens=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    torch.manual_seed(0)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["A", "B"], cfg, method="kdpo", teacher=teacher)
    assert m["distill_loss"] == 0.0 and m["gate_frac"] == 0.0 and math.isfinite(m["loss"])


# ---- 5. Token-level teacher divergence: the generalized JSD of GKD (arXiv 2306.13649), on-policy -----------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_hand_computation(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = (hand_jsd(s, t, beta, temperature) * mask).sum() / mask.sum()
    got = kepo.generalized_jsd(s, t, mask, beta=beta, temperature=temperature)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_generalized_jsd_in_token_chunks_equals_one_pass(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    t, mask = torch.randn(3, 5, 11, generator=gen), (torch.rand(3, 5, generator=gen) < 0.7).float()
    results = []
    for chunk in (1000, 2):  # one chunk, then 2 tokens a chunk (the last one shorter)
        monkeypatch.setattr(kepo, "JSD_CHUNK_TOKENS", chunk)
        s = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2), requires_grad=True)
        loss = kepo.generalized_jsd(s, t, mask, beta=0.3, temperature=0.7)
        loss.backward()
        results.append((loss, s.grad))
    expected = hand_jsd(s.detach(), t, 0.3, 0.7)[mask.bool()].mean()
    assert mask.sum() > 2 and abs(results[0][0].item() - expected.item()) < 1e-6
    assert abs(results[1][0].item() - expected.item()) < 1e-6
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-7, rtol=0)


def test_generalized_jsd_endpoints_match_torch_kl_div():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.ones(2, 4)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    forward = F.kl_div(ls, lt, reduction="sum", log_target=True) / 8  # KL(teacher || student)
    reverse = F.kl_div(lt, ls, reduction="sum", log_target=True) / 8  # KL(student || teacher)
    assert torch.allclose(kepo.generalized_jsd(s, t, mask, beta=0.0), forward, atol=1e-6)
    assert torch.allclose(kepo.generalized_jsd(s, t, mask, beta=1.0), reverse, atol=1e-6)
    assert not torch.allclose(forward, reverse)


def test_generalized_jsd_zero_for_identical_and_bounded():
    s = torch.randn(2, 3, 9)
    assert kepo.generalized_jsd(s, s.clone(), torch.ones(2, 3)).abs() < 1e-6
    t = torch.randn(2, 3, 9) * 50  # a JSD with beta=0.5 never exceeds log 2
    assert kepo.generalized_jsd(s, t, torch.ones(2, 3), beta=0.5) <= math.log(2) + 1e-6


def test_generalized_jsd_empty_mask_is_finite_zero_with_zero_grad():
    s = torch.randn(2, 3, 9, requires_grad=True)
    loss = kepo.generalized_jsd(s, torch.randn(2, 3, 9), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_generalized_jsd_survives_masked_vocabulary():
    s, t = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    s[..., 0] = t[..., 0] = -1e9  # suppressed token, as completion_logits masks it
    s.requires_grad_(True)
    loss = kepo.generalized_jsd(s, t, torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_teacher_runs_only_on_gated_rows(tokenizer):
    student, teacher, prompts, _, cfg = scripted_setup(tokenizer)
    ids = torch.randint(5, len(tokenizer), (8, 3), generator=torch.Generator().manual_seed(0))
    rollouts = kepo.Rollouts(prompts.select([0] * 4 + [1] * 4), ids, torch.ones(8, 3, dtype=torch.int), [""] * 8)
    logits = kepo.completion_logits(student, rollouts)
    gate = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    loss = kepo.distillation_loss(logits, teacher, rollouts, gate, cfg, kepo.gated_tokens(rollouts, gate))
    assert teacher.calls == [("forward", 3)] and loss > 0
    teacher.calls.clear()
    empty = kepo.distillation_loss(logits, teacher, rollouts, torch.zeros(8, dtype=torch.bool), cfg, torch.tensor(0.))
    assert teacher.calls == [] and empty.item() == 0.0


# ---- 6. Hint learning: the teacher writes a hint from the ground truth -------------------------------------------
def test_extract_hint():
    assert kepo.extract_hint("blah <hint> look at the size </hint> rest") == "look at the size"
    assert kepo.extract_hint("<hint>   </hint>") is None
    assert kepo.extract_hint("no hint here") is None
    assert kepo.extract_hint("<hint>unclosed") is None


def test_groups_without_a_hint_tag_are_not_sampled(tokenizer):
    rule = lambda i, row: "<hint> look at lesion </hint>" if i == 0 else "look at lesion"  # noqa: E731
    student, teacher, prompts, hints, cfg = scripted_setup(tokenizer, teacher_rule=rule)
    assert kepo.write_hints(teacher, tokenizer, prompts, cfg) == ["look at lesion", None]
    rollouts = kepo.generate_rollouts(student, tokenizer, prompts, 4, temperature=1.0, max_new_tokens=8)
    out, stats = kepo.knowledge_enhance(student, teacher, tokenizer, rollouts, torch.ones(8), ["B", "A"], [0, 1],
                                        hints, cfg)
    assert stats["hint_written"] == 1 and stats["hint_injected"] == 2
    assert student.calls[-1] == ("generate", 2)  # K = 2 hinted samples of group 0 only
    assert out.texts == [answer("b")] * 2 + [answer("c")] * 6


# ---- 7. Rejection sampling and injection: correct hinted samples join the hint-free group ------------------------
def test_rejection_sampling_keeps_each_correct_sample(tokenizer):
    """K = 2, one correct sample of two per try: per-sample acceptance keeps it; all-or-nothing would keep none."""
    student = ScriptedVLM(tokenizer, lambda i, row: answer("b" if i % 2 == 0 else "c"))
    hinted = prompt_batch(tokenizer, ["hint look answer b"])
    for attempts, kept in ((1, 1), (2, 2)):
        cfg = kepo.KEPOConfig(group_size=4, num_hinted=2, max_attempts=attempts, max_new_tokens=8)
        accepted = kepo.rejection_sample(student, tokenizer, hinted, ["B"], cfg)
        assert len(accepted[0]) == kept and all(text == answer("b") for _, text in accepted[0])


@pytest.mark.parametrize("per_call,calls", [(3, [12]), (1, [4, 4, 2])])
def test_rejection_sampling_batches_tries_and_keeps_the_first_k_correct_in_order(tokenizer, monkeypatch, per_call,
                                                                                 calls):
    """K = 2, 3 tries: all in one call (an accelerator) or one per call (a CPU), the same samples kept, in order."""
    pattern = ["c", "b", "c", "b", "b", "c"]  # the j-th sample of a prompt, over all its tries, answers pattern[j]

    def rule(i, row):  # row i of call c: sample j = 2c + i % 2 with one try per call, i % 6 with all three
        j = 2 * (len(student.calls) - 1) + i % 2 if per_call == 1 else i % 6
        return answer(pattern[j]) + " look" * j
    student = ScriptedVLM(tokenizer, rule)
    assert kepo.tries_per_call(torch.device("cpu"), 3) == 1 and kepo.tries_per_call(torch.device("cuda"), 3) == 3
    monkeypatch.setattr(kepo, "tries_per_call", lambda device, attempts: per_call)
    hinted = prompt_batch(tokenizer, ["hint look answer b", "hint look answer a"])
    cfg = kepo.KEPOConfig(group_size=4, num_hinted=2, max_attempts=3, max_new_tokens=16)
    accepted = kepo.rejection_sample(student, tokenizer, hinted, ["B", "A"], cfg)
    assert [n for _, n in student.calls] == calls  # one try per call: prompt 0 is done after two
    assert [text for _, text in accepted[0]] == [answer("b") + " look", answer("b") + " look look look"]
    assert accepted[1] == []  # no sample answers A


def test_cliff_groups_trigger_criteria():
    acc = torch.tensor([0.0, 0, 1, 0, 0, 0])
    fmt = torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert kepo.cliff_groups(acc, acc + fmt, 2, "accuracy") == [0, 2]
    assert kepo.cliff_groups(acc, acc + fmt, 2, "reward") == [2]


def test_inject_replaces_distinct_failed_slots_and_keeps_hint_free_prompts():
    g = 4
    r = make_rollouts([[i + 10] * (1 + i % 3) for i in range(12)])
    rewards = torch.tensor([1.0, 0, 2, 0, 0, 0, 0, 0, 2, 1, 0, 1])
    new = [(torch.tensor([7, 7, 7, 7, 7]), "h0"), (torch.tensor([8]), "h1")]
    out = kepo.inject(r, rewards, g, {0: new, 2: new[:1]}, pad_id=0)
    # group 0: the two reward-0 rows (1, 3) are replaced, in order; the correct ones survive
    assert out.texts[:4] == ["t0", "h0", "t2", "h1"]
    assert out.completion_ids[1].tolist() == [7] * 5 and out.completion_mask[1].sum() == 5
    assert out.completion_ids[3].tolist() == [8, 0, 0, 0, 0] and out.completion_mask[3].tolist() == [1, 0, 0, 0, 0]
    # group 2: only its lowest-reward row (10) is replaced
    assert out.texts[8:] == ["t8", "t9", "h0", "t11"]
    # group 1 untouched, and every prompt is the original hint-free one
    assert out.texts[4:8] == r.texts[4:8]
    for i in list(range(4, 8)) + [0, 2, 8, 9, 11]:
        n = int(r.completion_mask[i].sum())
        assert out.completion_ids[i, :n].tolist() == r.completion_ids[i, :n].tolist()
    assert torch.equal(out.prompts.input_ids, r.prompts.input_ids)
    assert torch.equal(out.prompts.vision["pixel_values"], r.prompts.vision["pixel_values"])


def test_knowledge_enhance_accepts_correct_hinted_samples(tokenizer):
    teacher = ScriptedVLM(tokenizer, lambda i, row: "<hint> look at lesion </hint>")
    student = ScriptedVLM(tokenizer, lambda i, row: "<think> large </think> <answer> b </answer>")
    prompts = prompt_batch(tokenizer, ["what is shown"] * 3)
    seen = {}

    def hinted(idx, hints):
        seen["hints"] = hints
        return prompt_batch(tokenizer, [f"hint {h}" for h in hints])

    hp = kepo.HintPrompts(request=lambda idx: prompts.select(idx), hinted=hinted)
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=8, num_hinted=1, max_attempts=2)
    rollouts = kepo.Rollouts(prompts.select([0, 0, 1, 1, 2, 2]), torch.full((6, 2), 5),
                             torch.ones(6, 2, dtype=torch.int), ["x"] * 6)
    out, stats = kepo.knowledge_enhance(student, teacher, tokenizer, rollouts, torch.zeros(6), ["B", "A", "B"],
                                        [0, 1, 2], hp, cfg)
    assert seen["hints"] == ["look at lesion"] * 3
    # the student always answers B: groups 0 and 2 get one injected sample each, group 1 none
    assert stats == {"hint_groups": 3, "hint_written": 3, "hint_accept_rate": 2 / 3, "hint_injected": 2}
    assert kepo.accuracy_reward(out.texts, ["B", "B", "A", "A", "B", "B"]).tolist() == [1, 0, 0, 0, 1, 0]
    assert torch.equal(out.prompts.input_ids, rollouts.prompts.input_ids)


# ---- 8. Loss and step: eq. 7, policy loss + gated distillation, one optimizer step -------------------------------
def test_injected_hinted_samples_are_rescored_and_the_loss_matches_a_hand_computation(tokenizer, monkeypatch):
    student, teacher, prompts, hints, cfg = scripted_setup(tokenizer, tau=2.0)
    # by hand: 2 correct hinted samples replace slots 0-1 of each group, under the hint-free prompt
    texts = [answer("b")] * 2 + [answer("c")] * 2 + [answer("a")] * 2 + [answer("c")] * 2
    ids = torch.tensor([tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts])
    rows = prompts.select([0] * 4 + [1] * 4)
    allowed = [i for i in range(len(tokenizer)) if i not in kepo.suppressed_ids(tokenizer, student)]
    with torch.no_grad():
        def logits(m):  # a plain forward; suppressed ids have probability 0, so they are dropped from the vocabulary
            att = torch.cat([rows.attention_mask, torch.ones_like(ids)], 1)
            out = m.model(input_ids=torch.cat([rows.input_ids, ids], 1), attention_mask=att, **rows.vision).logits
            return out[:, rows.input_ids.shape[1] - 1:-1, allowed]
        jsd = hand_jsd(logits(student), logits(teacher), 0.5, 1.0)
    gated = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)  # r = 2 only on the injected rows
    expected = jsd[gated].mean()  # the policy term is -mean(A) = 0 at ratio 1
    seen = {}
    real_backward = kepo.kepo_backward
    monkeypatch.setattr(kepo, "kepo_backward", lambda *a, **k: seen.setdefault("args", a) and real_backward(*a, **k))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["B", "A"], cfg, method="kepo", teacher=teacher,
                       hint_prompts=hints)
    rollouts, rewards = seen["args"][2], seen["args"][3]
    assert rollouts.texts == texts and torch.equal(rollouts.prompts.input_ids, rows.input_ids)
    assert rewards.tolist() == [2, 2, 1, 1, 2, 2, 1, 1] and m["reward"] == 1.5 and m["hint_injected"] == 4
    assert (kepo.group_advantages(rewards, 4)[gated] > 0).all()
    assert m["gate_frac"] == 0.5 and m["loss"] == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("trigger,hinted", [("accuracy", True), ("reward", False)])
def test_cliff_trigger_reaches_the_step(tokenizer, trigger, hinted):
    """Every rollout is well formatted but wrong (r = 1): a cliff for "accuracy", not for the authors' "reward"."""
    student, teacher, prompts, hints, cfg = scripted_setup(tokenizer, cliff_trigger=trigger)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["B", "A"], cfg, method="kepo", teacher=teacher,
                       hint_prompts=hints)
    assert m["sample_accuracy"] == 0 and m["sample_format"] == 1
    assert m.get("hint_groups", 0) == (2 if hinted else 0)
    assert (("generate", 2) in teacher.calls) == hinted


def test_kl_to_a_reference_is_finite_after_early_eos(tokenizer):
    """beta_rl > 0 with completions that end early: the pad positions hold suppressed ids (log-prob ~ -1.1e9).

    The reference is the same policy; only its logits' constant offset differs, which moves the
    pad positions' log-prob by one float32 step (128 at 1.1e9). The KL must be 0, not NaN.
    """
    short_and_long = lambda i, row: answer("b") if i % 2 else answer("c") + " look at lesion"  # noqa: E731
    student = ScriptedVLM(tokenizer, short_and_long, logit_offset=300.0)
    ref = ScriptedVLM(tokenizer, short_and_long)
    prompts = prompt_batch(tokenizer, ["what is shown"] * 2)
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=12, beta_rl=0.1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["B", "A"], cfg, method="grpo", ref_model=ref)
    assert m["completions/mean_length"] < 12 and math.isfinite(m["loss"]) and m["kl"] == pytest.approx(0, abs=1e-5)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_config_and_step_refuse_bad_settings_before_sampling(tokenizer):
    for field, value in [("group_size", 1), ("num_hinted", 9), ("beta_jsd", 1.5), ("tau", 3.0), ("tau", -1.0),
                         ("hint_mode", "adaptve"), ("cliff_trigger", "format")]:
        with pytest.raises(ValueError, match=f"KEPOConfig.{field}="):
            kepo.KEPOConfig(**{field: value})
    kepo.KEPOConfig(tau=None), kepo.KEPOConfig(tau=2.0)  # the ends of the range are legal
    student, _, prompts, _, _ = scripted_setup(tokenizer)
    with pytest.raises(ValueError, match="needs a ref_model"):
        kepo.kepo_step(student, None, tokenizer, prompts, ["B", "A"], kepo.KEPOConfig(beta_rl=0.1), method="grpo")
    assert student.calls == []  # refused before any sampling


@pytest.mark.parametrize("device", DEVICES)
def test_kepo_step_runs_and_changes_weights(tokenizer, device):
    student, teacher, prompts, cfg, hints = step_setup(tokenizer, device, tau=0.0, hint_mode="always")
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["A", "B"], cfg, method="kepo", teacher=teacher,
                       ref_model=tiny_vlm(tokenizer).to(device), hint_prompts=hints)
    assert math.isfinite(m["loss"]) and m["distill_loss"] > 0 and m["gate_frac"] == 1.0
    assert m["hint_groups"] == 2 and 0 <= m["hint_accept_rate"] <= 1 and m["kl"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "cliff_groups"):
        assert math.isfinite(m[key])


def fixed_rollouts(tok, n=8, length=5, seed=0):
    """n rollouts of random ids with lengths 1..length, their prompts cycling over two questions."""
    prompts = prompt_batch(tok, ["what finding is shown options a b", "what is shown"])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (n, length), generator=gen)
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=gen)).int()
    return kepo.Rollouts(prompts.select([i % 2 for i in range(n)]), ids, mask, [""] * n)


@pytest.mark.parametrize("method", ["kdpo", "opd"])
def test_micro_batches_give_the_full_batch_loss_and_gradients(tokenizer, method):
    """Chunks of 1, 3 and N rows; with 3, rows 3-5 gate nothing and the other chunks gate different counts."""
    rollouts = fixed_rollouts(tokenizer)
    rewards = torch.tensor([2.0, 0, 1, 0, 0, 0, 2, 1])  # tau = 1: rows 0, 2, 6, 7
    teacher, ref = tiny_vlm(tokenizer, 48, seed=1), tiny_vlm(tokenizer, 32, seed=2)
    results = []
    for size in (None, 1, 3, 8):
        student = tiny_vlm(tokenizer, 32, seed=0)
        cfg = kepo.KEPOConfig(group_size=2, tau=1.0, beta_rl=0.1, micro_batch_size=size)
        parts = kepo.kepo_backward(student, teacher, rollouts, rewards, method, cfg, ref_model=ref)
        results.append((parts, grads(student)))
    (full, full_grad), chunked = results[0], results[1:]
    assert full["distill_loss"] > 0 and (method == "opd" or full["policy_loss"] != 0)
    for parts, grad in chunked:
        assert parts.keys() == full.keys()
        for key in ("loss", "policy_loss", "distill_loss", "kl", "gate_frac"):
            assert parts[key] == pytest.approx(full[key], abs=1e-6), key
        assert (grad - full_grad).abs().max() < 1e-6


# bf16 keeps 8 mantissa bits (relative steps of 0.4%) in weights and logits; these models' JSD moved by 3e-4
# relative (measured), so 1% is a bound that a loss computed in bf16 arithmetic would be likely to break
BF16_RTOL = 0.01


def test_bf16_models_give_a_finite_loss_close_to_fp32(tokenizer):
    """bf16 weights, fp32 maths: log-softmax, JSD and policy loss are computed in fp32 from bf16 logits."""
    rollouts = fixed_rollouts(tokenizer)
    rewards = torch.tensor([2.0, 0, 1, 0, 0, 0, 2, 1])
    cfg = kepo.KEPOConfig(group_size=2, tau=1.0)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        student = tiny_vlm(tokenizer, 32, seed=0).to(dtype)
        teacher = tiny_vlm(tokenizer, 48, seed=1).to(dtype)
        losses[dtype] = kepo.kepo_backward(student, teacher, on_dtype(rollouts, dtype), rewards, "kdpo", cfg)
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    fp32, bf16 = losses[torch.float32], losses[torch.bfloat16]
    assert math.isfinite(bf16["loss"]) and fp32["distill_loss"] > 0
    assert bf16["distill_loss"] == pytest.approx(fp32["distill_loss"], rel=BF16_RTOL)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=BF16_RTOL, abs=1e-6)


def on_dtype(rollouts: kepo.Rollouts, dtype) -> kepo.Rollouts:
    vision = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rollouts.prompts.vision.items()}
    return replace(rollouts, prompts=kepo.PromptBatch(rollouts.prompts.input_ids,
                                                                       rollouts.prompts.attention_mask, vision))


def test_opd_step_uses_every_rollout(tokenizer):
    student, teacher, prompts, cfg, _ = step_setup(tokenizer, tau=None)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    m = kepo.kepo_step(student, opt, tokenizer, prompts, ["A", "B"], cfg, method="opd", teacher=teacher)
    assert m["gate_frac"] == 1.0 and m["distill_loss"] > 0 and m["policy_loss"] == 0.0


def test_step_rejects_missing_teacher_or_unknown_method(tokenizer):
    student, _, prompts, cfg, _ = step_setup(tokenizer)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for method in ("kepo", "ppo"):
        with pytest.raises(ValueError, match="method must be one of"):
            kepo.kepo_step(student, opt, tokenizer, prompts, ["A", "B"], cfg, method=method)


BENCH_VOCAB, BENCH_ROWS, BENCH_TOKENS = 151_936, 32, 64  # Qwen2/3-VL's vocabulary; N = 32 rollouts x 64 tokens


def memory_worker(micro_batch_size: int | None):
    """Run by the memory benchmark in a fresh process: one kdpo backward, every row gated; prints peak RSS."""
    import resource
    tok = make_tokenizer()
    torch.manual_seed(0)
    student, teacher = (tiny_vlm(tok, hidden, seed, vocab=BENCH_VOCAB) for hidden, seed in ((32, 0), (48, 1)))
    prompts = prompt_batch(tok, ["what is shown"] * BENCH_ROWS)
    ids = torch.randint(len(tok), BENCH_VOCAB, (BENCH_ROWS, BENCH_TOKENS))
    rollouts = kepo.Rollouts(prompts, ids, torch.ones_like(ids, dtype=torch.int), [""] * BENCH_ROWS)
    cfg = kepo.KEPOConfig(group_size=8, tau=0.0, micro_batch_size=micro_batch_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parts = kepo.kepo_backward(student, teacher, rollouts, torch.ones(BENCH_ROWS), "kdpo", cfg)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"micro_batch_size": micro_batch_size, "loss": parts["loss"],
                      "models_mib": before / 1024, "peak_mib": after / 1024}))


@pytest.mark.skipif(not os.environ.get("KEPO_BENCH"), reason="memory benchmark: set KEPO_BENCH=1 (about 1 min)")
def test_memory_benchmark_micro_batches_bound_the_peak():
    """README "Memory": peak RSS of one step with a real-size vocabulary, all rows at once vs micro-batches of 4."""
    rows = []
    for size in ("all", "4"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", size],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("\n" + "\n".join(json.dumps(r) for r in rows))
    (full, micro), growth = rows, [r["peak_mib"] - r["models_mib"] for r in rows]
    assert micro["loss"] == pytest.approx(full["loss"], abs=1e-5)
    assert growth[0] >= 4 * growth[1]


@pytest.mark.skipif(not os.environ.get("KEPO_BENCH_OUT"), reason="hint timing: set KEPO_BENCH_OUT=<--out with the "
                    "cpu preset's seed-1 stages> (about 2 min)")
def test_hint_timing_benchmark_one_call_against_tries_in_turn(monkeypatch):
    """README "Memory and speed on one GPU": OPD and KEPO with the tries batched or in turn, interleaved step
    by step."""
    a = ts.Args(**ts.PRESETS["cpu"], preset="cpu", out=os.environ["KEPO_BENCH_OUT"], device="cpu")
    data, proc, cfg = ts.toy_data(a), ts.build_processor(), ts.kepo_config(a)
    teacher = ts.load_model(os.path.join(a.out, "cpu-teacher"), "cpu", "")
    variants = {"opd": ("opd", 1), "kepo, one try per call": ("kepo", 1), "kepo, all tries in one call": ("kepo", 5)}
    runs = {}
    for name in variants:
        model = ts.load_model(os.path.join(ts.seed_root(a), "student_init"), "cpu", "")
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0), [])
    for step in range(1, 31):
        exs = random.Random(f"{a.seed}-rl-{step}").sample(data.train, a.batch_prompts)
        for name, (method, per_call) in variants.items():
            model, opt, rows = runs[name]
            monkeypatch.setattr(kepo, "tries_per_call", lambda device, attempts, n=per_call: n)
            torch.manual_seed(step)
            start = time.perf_counter()
            m = kepo.kepo_step(model, opt, proc.tokenizer, ts.student_prompts(proc, exs, "cpu"),
                               [e.answer for e in exs], cfg, method, teacher=teacher,
                               hint_prompts=ts.hint_prompts(exs, proc, "cpu"))
            rows.append(m | {"time/step": time.perf_counter() - start})
    opd = sum(m["time/step"] for m in runs["opd"][2]) / 30
    for name, (_, _, rows) in runs.items():
        mean = {k: sum(m.get(k, 0.0) for m in rows) / len(rows) for k in ("time/step", "time/hints", "hint_groups")}
        print(f"{name}: step {mean['time/step']:.3f} s, hints {mean['time/hints']:.3f} s, "
              f"{mean['hint_groups']:.2f} groups hinted, ratio to OPD {mean['time/step'] / opd:.2f}")
    assert all(math.isfinite(m["loss"]) for _, _, rows in runs.values() for m in rows)


def torchrun(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, timeout=300, **kwargs)


def distributed_worker(mode: str):
    """Run by test_ddp_... and test_sharded_...: `torchrun --nproc_per_node 2 test_kepo.py --worker ddp|shard`.

    Fixed rollouts, one global batch: the loss and gradients of 2 ranks against one process's.
    """
    tok = make_tokenizer()
    cfg = kepo.KEPOConfig(group_size=2, tau=1.0)
    teacher = tiny_vlm(tok, 48, seed=1)
    prompts = prompt_batch(tok, ["what finding is shown options a b", "what is shown", "look at lesion", "a b c d"])
    ids = torch.randint(5, len(tok), (8, 5), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 2, 5, 1, 3, 4])[:, None]).int()
    rollouts = kepo.Rollouts(prompts.select([0, 0, 1, 1, 2, 2, 3, 3]), ids, mask, [""] * 8)
    # tau=1 gates rows 0, 2, 3 (11 tokens) on rank 0 and row 7 (4 tokens) on rank 1; in micro-batches
    # of 3 rows, rank 1's first gates nothing while rank 0's first runs the teacher
    rewards = torch.tensor([2.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0])
    single = tiny_vlm(tok, 32, seed=0)  # one process, the whole batch (before the group exists)
    loss = kepo.kepo_backward(single, teacher, rollouts, rewards, "kdpo", cfg)["loss"]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT))
    rank, student = dist.get_rank(), tiny_vlm(tok, 32, seed=0)
    if mode == "shard":
        student, teacher = ts.shard(student, "cpu"), ts.shard(teacher, "cpu")
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if mode == "ddp" \
        else student
    rows = list(range(4 * rank, 4 * rank + 4))
    part = kepo.kepo_backward(model, teacher, rollouts.select(rows), rewards[rows], "kdpo",
                              replace(cfg, micro_batch_size=3))
    mean = torch.tensor(part["loss"])
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    diff = (grads(student) - grads(single)).abs().max().item()
    print(f"rank {rank}: single {loss:.8f} {mode} {mean.item():.8f} max grad diff {diff:.2e}")
    assert abs(mean.item() - loss) < 1e-6, (mean, loss)
    assert diff < 1e-6
    if mode == "shard":
        held = torch.tensor([sum(p.to_local().numel() for p in m.parameters()) for m in (student, teacher)])
        whole = torch.tensor([sum(p.numel() for p in m.parameters()) for m in (single, teacher)])
        print(f"rank {rank}: holds {(held / whole).tolist()} of the student's and the teacher's weights")
        assert (held <= 0.6 * whole).all()  # each rank about half (each block is split on its first dimension)
        dist.all_reduce(held)
        assert torch.equal(held, whole)
        sharded_hints_run_in_lockstep(tok, student, teacher, rank)
    # Tear down in order. DDP's reducer holds the process group, and gloo's worker thread frees
    # each finished all_reduce (whose tensors need the GIL) after the caller has moved on; a
    # group destroyed under the GIL before that deadlocks. The barrier drains the queue first.
    del model
    dist.barrier()
    dist.destroy_process_group()


WORKER_TIMEOUT = 60  # seconds a rank waits in a collective: a rank left waiting by the other fails the test


def sharded_hints_run_in_lockstep(tok, student, teacher, rank):
    """Sampling where rank 1 stops first, a KEPO step where rank 0 has a cliff group and rank 1 none, then
    rejection sampling where rank 1 accepts at its first try and rank 0 never: each rank's work differs, yet
    every forward of the sharded models needs both ranks. Run in this worker process only: it patches kepo."""
    prompts = prompt_batch(tok, ["what is shown", "look at lesion"])
    # rank 1's samples all end at their first token (all else suppressed), rank 0's run on: generate stays in step
    others = [i for i in range(len(tok)) if i != tok.eos_token_id] if rank == 1 else []
    out = kepo.generate_rollouts(student, tok, prompts, 2, temperature=1.0, max_new_tokens=6, suppress=others)
    assert rank == 0 or out.completion_ids.shape[1] == 1
    hints = kepo.HintPrompts(request=prompts.select, hinted=lambda idx, h: prompts.select(idx))
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_hint_tokens=4, max_attempts=3)
    kepo.extract_hint = lambda text: "look"  # the random teacher writes no tags
    kepo.cliff_groups = lambda *args: [0] if rank == 0 else []
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    m = kepo.kepo_step(student, opt, tok, prompts, ["a", "b"], cfg, "kepo", teacher, hint_prompts=hints)
    assert (m.get("hint_groups", 0), m.get("hint_written", 0)) == ((1, 1) if rank == 0 else (0, 0)), m
    kepo.accuracy_reward = lambda texts, answers: torch.full((len(texts),), float(rank == 1))
    accepted = kepo.rejection_sample(student, tok, prompts, ["a", "b"], cfg)
    assert [len(a) for a in accepted] == ([0, 0] if rank == 0 else [2, 2])
    print(f"rank {rank}: hints and rejection sampling in lockstep")


def grads(model):
    """All gradients in one flat tensor; a sharded model's are gathered whole (a collective)."""
    return torch.cat([(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).flatten()
                      for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["ddp", "shard"])
def test_two_ranks_give_one_process_loss_and_gradients_on_the_same_global_batch(mode):
    # fixed rollouts: sampled ones differ across world sizes (each rank draws its own stream)
    proc = torchrun(os.path.abspath(__file__), "--worker", mode)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("max grad diff") == 2
    assert proc.stdout.count("in lockstep") == (2 if mode == "shard" else 0)


# ---- train_small.py: the toy, its stages and its command line ----------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_script("--preset", "smoke", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_toy_questions_are_consistent_and_fixed_by_seed():
    a = ts.make_split(3, "train", "mri", 200)
    assert a == ts.make_split(3, "train", "mri", 200) and a != ts.make_split(4, "train", "mri", 200)
    assert {e.qtype for e in a} == set(ts.QUESTIONS)
    for e in a:
        letter = ts.LETTERS.index(e.answer)
        assert e.options[letter] == e.evidence.split()[-1]  # the answer letter points at the evidence
        assert len(set(e.options)) == len(e.options)
        target = ts.answer_text(e).replace(" <eos>", "")
        assert kepo.kepo_reward([target], [e.answer]).item() == 2.0
    assert ts.draw(a[0].case).tobytes() == ts.draw(ts.make_split(3, "train", "mri", 1)[0].case).tobytes()
    described = ts.describe_text(a[0].case)
    assert f"organ {a[0].case.organ}" in described and f"modality {a[0].case.modality}" in described


def test_toy_prompts_round_trip_through_the_tokenizer():
    proc = ts.build_processor()
    e = ts.make_split(0, "test", "ct", 1)[0]
    for text in (ts.prompt_text(e), ts.hint_request_text(e), ts.hinted_text(e, e.evidence), ts.answer_text(e)):
        assert proc.tokenizer.unk_token not in proc.tokenizer.tokenize(text)


def test_bank_batches_equal_the_processor_path(tmp_path):
    proc = ts.build_processor()
    exs = ts.make_split(0, "test", "oct", 3)
    banked = ts.with_pixels(exs, str(tmp_path / "bank.pt"))
    assert ts.with_pixels(exs, str(tmp_path / "bank.pt"))[2].pixels.equal(banked[2].pixels)  # read back, not redrawn
    texts = [ts.prompt_text(e) for e in exs]
    fast, slow = ts.encode(proc, banked, texts, "cpu"), ts.encode(proc, exs, texts, "cpu")
    assert fast.input_ids.equal(slow.input_ids) and fast.attention_mask.equal(slow.attention_mask)
    assert fast.vision.keys() == slow.vision.keys()
    torch.testing.assert_close(fast.vision["pixel_values"], slow.vision["pixel_values"], atol=1e-6, rtol=0)
    assert (slow.input_ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [ts.IMAGE_TOKENS] * 3


def test_chance_by_hand():
    def q(modality, qtype, n_options):
        return ts.Example(None, qtype, "q", tuple("wxyz"[:n_options]), "a", "", modality=modality)
    exs = [q("mri", "anatomy", 4), q("mri", "attribute", 2), q("ct", "grading", 3), q("ct", "attribute", 3),
           q("oct", "anatomy", 4)]
    data = ts.Data(["ct", "mri", "oct"], ["anatomy", "grading", "attribute"], "mri", [], [], exs, [], [], [], "hand")
    row = ts.summarize(exs, ts.chance(exs), data)
    assert row["mri"] == pytest.approx((1 / 4 + 1 / 2) / 2) and row["ID"] == row["mri"]
    assert row["ct"] == pytest.approx((1 / 3 + 1 / 3) / 2) and row["oct"] == pytest.approx(1 / 4)
    assert row["OOD"] == pytest.approx((1 / 3 + 1 / 4) / 2)  # the mean of the OOD modalities, not of questions
    assert row["q/attribute"] == pytest.approx((1 / 2 + 1 / 3) / 2) and row["q/grading"] == pytest.approx(1 / 3)


def test_premises_hold_and_fail_at_their_thresholds():
    def row(acc, ood=None, idd=None):
        r = {m: acc for m in ts.MODALITIES} | {f"q/{q}": acc for q in ts.QUESTIONS}
        return r | {"OOD": acc if ood is None else ood, "ID": acc if idd is None else idd}
    rows = {"chance": row(0.30), "teacher": row(0.95), "student (before RL)": row(0.6, ood=0.5, idd=0.7)}
    assert all(it["holds"] for it in ts.premises(rows, 0.2, {m: 0.9 for m in ts.MODALITIES}))
    rows["teacher"]["q/grading"] = 0.89  # one weak question type is enough to fail the teacher premise
    rows["student (before RL)"]["OOD"] = 0.44  # below chance + 0.15
    items = ts.premises(rows, 0.1, {m: 0.9 for m in ts.MODALITIES} | {"oct": 0.8})
    failed = [it["premise"] for it in items if not it["holds"]]
    assert failed == ["teacher accuracy, worst question type (grading)", "warm student OOD accuracy",
                      "learning cliff: train prompts with all G samples wrong",
                      "base student names the organ, worst modality (oct)"]


def test_smoke_pipeline_prints_table_writes_json_and_reloads(smoke):
    out, stdout = smoke
    header = next(line for line in stdout.splitlines() if "mri*" in line)
    assert all(m in header for m in ts.MODALITIES) and "OOD" in header
    assert "learning cliff before RL" in stdout and "rl-kepo" in stdout and "| chance |" in stdout
    assert "premises" in stdout and "base student names the organ" in stdout
    # one seed's premises table names the worst modality (over seeds the report leaves it out)
    assert re.search(r"\| base student names the organ, worst modality \(\w+\) \| [0-9.]+( ✗)? \|", stdout)
    assert json.loads((out / "smoke-base" / "stage.json").read_text())["times"]["seconds"] > 0  # the base stage ran
    root = out / "smoke-seed1"
    before = json.loads((root / "before_rl.json").read_text())
    assert set(before["base_describes"]) == set(ts.MODALITIES) and len(before["premises"]) == 6
    assert json.loads((root / "student_init" / "stage.json").read_text())["config"]["base"]["steps"] == 10
    res = json.loads((root / "rl-kepo" / "results.json").read_text())
    for key in ts.MODALITIES + ["ID", "OOD"]:
        assert 0.0 <= res[key] <= 1.0
    assert res["phases"]["time/generate"] > 0
    lines = [json.loads(x) for x in (root / "rl-kepo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    # the smoke run trains: every step has a reward spread and a gradient, some rows pass the gate, some get hints
    assert all(m["grad_norm"] > 0 and m["loss"] != 0 and m["reward_std"] > 0 for m in lines)
    assert all(0 < m["gate_frac"] for m in lines) and sum(m.get("hint_groups", 0) for m in lines) > 0
    trained, init = (ts.load_model(str(root / d), "cpu", "").state_dict() for d in ("rl-kepo/student", "student_init"))
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(root / "rl-kepo" / "student")
    proc = AutoProcessor.from_pretrained(root / "rl-kepo" / "student")
    e = ts.make_split(0, "test", "mri", 2)
    batch = ts.encode(proc, e, [ts.prompt_text(x) for x in e], "cpu")
    r = kepo.generate_rollouts(model, proc.tokenizer, batch, 1, temperature=0, max_new_tokens=4)
    assert len(r.texts) == 2


def refused(proc, message: str) -> bool:
    """The CLI stopped with one line naming the problem, no traceback (exit 2)."""
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return proc.returncode == 2 and "Traceback" not in proc.stderr and re.search(message, last) is not None


def kill_at_first_checkpoint(command: list[str], ckpt, how=signal.SIGKILL):
    """Start `command`, send it `how` as soon as `ckpt` exists, and check it had not finished.
    (torchrun stops its workers on SIGTERM; killed, it would leave them running.)"""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not ckpt.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(how)
    assert run.wait() != 0 and not (ckpt.parent / "results.json").exists(), "the run finished before it was killed"


def rl_metrics(root):
    """The smoke kepo run's metrics.jsonl under `root`, without the timings."""
    lines = (root / "smoke-seed1" / "rl-kepo" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]


def test_killed_run_resumes_exactly_and_never_mixes_settings(smoke, tmp_path):
    """README "Interrupted runs": each case of a rerun over an unfinished or finished run."""
    out, _ = smoke
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "smoke-seed1" / "rl-kepo")
    flags = ["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"]
    ckpt = tmp_path / "smoke-seed1" / "rl-kepo" / "ckpt.pt"
    kill_at_first_checkpoint([sys.executable, os.path.join(HERE, "train_small.py"), *flags], ckpt)
    assert refused(run_script(*flags), "holds an unfinished run .*add --resume")
    grpo = ts.Args(**ts.PRESETS["smoke"], preset="smoke", method="grpo")
    assert ts.run_settings(grpo, ts.kepo_config(grpo)) == ts.run_settings(replace(grpo, tau=2.0), ts.kepo_config(
        replace(grpo, tau=2.0)))  # the gate does not shape grpo: a grpo run made under --compare --tau 2 is reused
    args = ts.Args(**ts.PRESETS["smoke"], preset="smoke", out=str(tmp_path), resume=True)
    for change, message in [({"lr": 1e-2}, "other settings .*lr 0.0003 then, 0.01 now"),
                            ({"group_size": 4}, "group_size 8 then, 4 now")]:
        with pytest.raises(ts.UserError, match=message):  # what the CLI prints in one line, as above
            ts.finished_or_resumable(replace(args, **change), ts.kepo_config(replace(args, **change)))
    resumed = run_script(*flags, "--resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-3000:]
    assert rl_metrics(tmp_path) == rl_metrics(out)
    a, b = (json.loads((r / "smoke-seed1" / "rl-kepo" / "results.json").read_text()) for r in (out, tmp_path))
    assert {k: a[k] for k in ts.MODALITIES} == {k: b[k] for k in ts.MODALITIES}
    assert not ckpt.exists()  # a finished run keeps its student/, not its checkpoint
    again = run_script(*flags)
    assert again.returncode == 0 and "its results are reused" in again.stdout
    for change, message in [({"lr": 1e-3, "resume": False}, "finished with other settings .*lr 0.0003 then, 0.001"),
                            ({"max_new_tokens": 20}, "max_new_tokens 12 then, 20 now")]:
        with pytest.raises(ts.UserError, match=message):
            ts.finished_or_resumable(replace(args, **change), ts.kepo_config(replace(args, **change)))


def test_interrupted_supervised_stage_continues_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "SFT_SAVE_SECONDS", -1)  # save after every step
    proc, pool = ts.build_processor(), ts.make_split(0, "pool", "ct", 8)
    config, partial = {"steps": 6, "batch": 4, "lr": 1e-3}, str(tmp_path / "stage.partial.pt")

    def train(stop_at=None):
        calls = []

        def draw_batch(rng, n):
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return ts.teacher_batch(rng, n, pool)
        torch.manual_seed(0)
        model = ts.build_vlm(proc.tokenizer, 16, 1)
        ts.sft(model, proc, draw_batch, config, "cpu", "stage", 0, partial)
        return model.state_dict()
    whole = train()
    os.remove(partial)
    with pytest.raises(KeyboardInterrupt):
        train(stop_at=4)  # Ctrl-C while preparing step 4: the state after step 3 is on disk
    assert torch.load(partial, weights_only=False)["clock"]["step"] == 3
    continued = train()
    assert all(torch.equal(whole[k], continued[k]) for k in whole)


def test_readme_usage_snippet_runs(smoke, tmp_path):
    """The README's "Using the trained student" block, run as written on the smoke run's student."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme[readme.index("### Using the trained student"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]
    (tmp_path / "runs").symlink_to(smoke[0])
    case = next(e for e in ts.make_split(0, "test", "mri", 20) if e.qtype == "diagnosis").case
    ts.draw(case).save(tmp_path / "scan.png")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # the student's answer


def test_corrupt_or_mismatched_cached_stage_names_itself(smoke, tmp_path):
    out, _ = smoke
    stage = tmp_path / "teacher"
    shutil.copytree(out / "smoke-teacher", stage)
    (stage / "model.safetensors").write_bytes(b"not a model")
    config, a = json.loads((stage / "stage.json").read_text())["config"], ts.Args(device="cpu")
    with pytest.raises(ts.UserError, match=f"cached stage {stage} cannot be loaded"):
        ts.sft_stage(a, str(stage), config, None, None, None, 0, "")
    with pytest.raises(ts.UserError, match=f"cached stage {stage} was built with"):  # other settings: never reused
        ts.sft_stage(a, str(stage), config | {"steps": 1}, None, None, None, 0, "")


def test_variants_map_to_distinct_run_folders():
    variants = [dict(method=m) for m in ts.METHODS] + [dict(tau=0.0), dict(tau=2.0), dict(hint_mode="always")]
    assert [ts.run_name(replace(ts.Args(), **v)) for v in variants] == ts.REPORT_ORDER[3:]


def test_report_aggregates_the_smoke_run(smoke):
    out, _ = smoke
    proc = run_script("--preset", "smoke", "--out", str(out), "--report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "smoke-report.md").read_text()
    for name in ("teacher", "student (before RL)", "rl-kepo"):
        assert f"| {name} | 1 |" in table
    assert "cliff prompts solved after RL" in table


def test_report_numbers_by_hand(tmp_path):
    """--report over two hand-made seeds: mean ± std over seeds, KEPO minus GRPO seed by seed, premise marks."""
    ood = {1: {"rl-grpo": 0.30, "rl-kepo": 0.40}, 2: {"rl-grpo": 0.50, "rl-kepo": 0.45}}
    for seed, runs in ood.items():
        premise = {"premise": "warm student OOD accuracy", "value": 0.3 * seed, "min": 0.4, "max": None,
                   "holds": seed == 2}
        before = {"rows": {"chance": {"mri": 0.25, "ct": 0.25, "q/anatomy": 0.25, "ID": 0.25, "OOD": 0.25}},
                  "premises": [premise], "key": {"train_modality": "mri"}}
        (tmp_path / f"smoke-seed{seed}").mkdir()
        (tmp_path / f"smoke-seed{seed}" / "before_rl.json").write_text(json.dumps(before))
        for name, value in runs.items():
            (tmp_path / f"smoke-seed{seed}" / name).mkdir()
            res = {"run": name, "mri": 0.5, "ct": value, "q/anatomy": 0.5, "ID": 0.5, "OOD": value,
                   "cliff_solved": 0.5, "rl_seconds": 10.0 * seed}
            (tmp_path / f"smoke-seed{seed}" / name / "results.json").write_text(json.dumps(res))
            steps = [{"step": 1, "hint_groups": 1.0}, {"step": 2, "hint_groups": 3.0 * seed}]
            (tmp_path / f"smoke-seed{seed}" / name / "metrics.jsonl").write_text(
                "".join(json.dumps(m) + "\n" for m in steps))
    ts.report(ts.Args(preset="smoke", out=str(tmp_path)))
    table = (tmp_path / "smoke-report.md").read_text()
    # OOD differences +0.10 and -0.05: mean 0.025, sample std sqrt(2 * 0.075^2) = 0.106, KEPO ahead on 1 of 2
    assert "| kepo - grpo | 0.025 ± 0.106 | 1/2 | 0.000 ± 0.000 | 0/2 |" in table
    # columns mri, ct, ID, OOD
    assert "| rl-kepo | 2 | 0.500 ± 0.000 | 0.425 ± 0.035 | 0.500 ± 0.000 | 0.425 ± 0.035 |" in table
    # triggered groups per step: seed 1 (1 + 3) / 2 = 2, seed 2 (1 + 6) / 2 = 3.5; RL seconds 10 and 20
    assert re.search(r"\| rl-grpo \| 2 \| 2\.750 ± 1\.061 \|.*\| 15\.000 ± 7\.071 \|", table)
    assert "| warm student OOD accuracy | 0.300 ✗ | 0.600 | >= 0.40 |" in table


def test_compare_runs_every_method_from_one_student(smoke, tmp_path):
    shutil.copytree(smoke[0], tmp_path, dirs_exist_ok=True)
    out = tmp_path
    shutil.rmtree(out / "smoke-seed1" / "rl-kepo")
    proc = run_script("--preset", "smoke", "--out", str(out), "--device", "cpu", "--compare", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("greedy accuracy"):]
    for name in ts.METHODS:
        assert f"| rl-{name} |" in table
        assert json.loads((out / "smoke-seed1" / f"rl-{name}" / "results.json").read_text())["settings"]["steps"] == 2
    assert "stage 3" not in proc.stdout  # every method starts from the cached warm student


def test_torchrun_smoke_trains_on_two_processes_and_rank0_writes(smoke, tmp_path):
    shutil.copytree(smoke[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "smoke-seed1" / "rl-kepo")
    proc = torchrun(os.path.join(HERE, "train_small.py"), "--preset", "smoke", "--out", str(tmp_path),
                    "--device", "cpu", "--steps", "2", "--ckpt-every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("greedy accuracy on") == 1  # only rank 0 prints
    run = tmp_path / "smoke-seed1" / "rl-kepo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss"]) for m in lines)
    assert json.loads((run / "results.json").read_text())["settings"]["world_size"] == 2
    # a checkpoint holds every rank's sampling state, so --resume continues both streams, with as many ranks: the
    # world size is one of the settings a resume must match, and this is checked before any work
    a = replace(ts.Args(**ts.PRESETS["smoke"], preset="smoke", out=str(tmp_path), device="cpu"), steps=2, resume=True)
    (run / "results.json").unlink()
    model, settings = ts.load_model(str(run / "student"), "cpu", ""), ts.run_settings(a, ts.kepo_config(a))
    ts.save_state(str(run / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()), step=1,
                  rng=[(torch.get_rng_state(), [])] * 2, settings=settings | {"world_size": 2})
    with pytest.raises(ts.UserError, match="world_size 2 then, 1 now"):
        ts.finished_or_resumable(a, ts.kepo_config(a))


def test_sharded_smoke_run_trains_saves_resumes_and_reloads(smoke, tmp_path):
    """--shard on 2 processes: a run killed after its first checkpoint and resumed ends as the run left alone,
    and its student loads in one process."""
    for name in ("whole", "killed"):
        shutil.copytree(smoke[0], tmp_path / name)
        shutil.rmtree(tmp_path / name / "smoke-seed1" / "rl-kepo")
    script = [os.path.join(HERE, "train_small.py"), "--preset", "smoke", "--device", "cpu", "--shard", "--steps", "3",
              "--ckpt-every", "1"]
    whole = torchrun(*script, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    run = killed / "smoke-seed1" / "rl-kepo"
    kill_at_first_checkpoint([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *script,
                              "--out", str(killed)], run / "ckpt.pt", signal.SIGTERM)
    resumed = torchrun(*script, "--out", str(killed), "--resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-3000:]
    assert rl_metrics(killed) == rl_metrics(tmp_path / "whole")
    assert all(m["grad_norm"] > 0 and m["gate_frac"] > 0 for m in rl_metrics(killed))
    settings = json.loads((run / "results.json").read_text())["settings"]
    assert settings["shard"] and settings["world_size"] == 2
    student, init = (ts.load_model(str(p), "cpu", "") for p in (run / "student",
                                                                   killed / "smoke-seed1" / "student_init"))
    other = ts.load_model(str(tmp_path / "whole" / "smoke-seed1" / "rl-kepo" / "student"), "cpu", "")
    weights = list(zip(student.state_dict().values(), init.state_dict().values(), other.state_dict().values()))
    assert any(not torch.equal(w, w0) for w, w0, _ in weights) and all(torch.equal(w, w1) for w, _, w1 in weights)
    # the two ranks' evaluation (each a slice of the questions) is the one process's
    args = ts.Args(**ts.PRESETS["smoke"], preset="smoke", out=str(killed), device="cpu")
    data, proc = ts.toy_data(args), AutoProcessor.from_pretrained(str(run / "student"))
    here = ts.summarize(data.test, ts.correctness(student, proc, data.test, ts.kepo_config(args), "cpu"), data)
    results = json.loads((run / "results.json").read_text())
    assert {m: here[m] for m in ts.MODALITIES} == {m: results[m] for m in ts.MODALITIES}


def test_torchrun_needs_the_stages_cached_by_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(kepo, "world_size", lambda: 2)
    with pytest.raises(ts.UserError, match="--steps 0"):
        ts.sft_stage(ts.Args(), str(tmp_path / "teacher"), {}, None, None, None, 0, "")


def save_tiny_paddleocr_vl(path, hidden: int, seed: int):
    """A second VLM family with Qwen2-VL-style inputs (flattened patches, image_grid_thw), saved with its processor."""
    tr = pytest.importorskip("transformers")
    if not hasattr(tr, "PaddleOCRVLImageProcessorPil"):
        pytest.skip("this transformers has no PIL image processor for PaddleOCR-VL")
    specials = ["<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>"]
    toy = ts.build_processor().tokenizer.get_vocab()
    words = [w for w in sorted(toy, key=toy.get) if w not in ts.TAGS]
    e = ts.make_split(0, "words", "mri", 1)[0]  # the words of the instructions a chat template gets
    for text in (ts.prompt_text(e, True), ts.hint_request_text(e, True), ts.hinted_text(e, "x", True)):
        words += [w for w, _ in ts.WORD_SPLIT.pre_tokenize_str(text.lower())]
    tok = ts.word_tokenizer(words, specials, "<|IMAGE_PLACEHOLDER|>")
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> {% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{% endfor %}")
    proc = tr.PaddleOCRVLProcessor(image_processor=tr.PaddleOCRVLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}), tokenizer=tok, chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = tr.PaddleOCRVLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=14, image_size=56),
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|IMAGE_START|>"], vision_end_token_id=ids["<|IMAGE_END|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    tr.PaddleOCRVLForConditionalGeneration(config).save_pretrained(path)
    proc.save_pretrained(path)
    try:
        tr.AutoProcessor.from_pretrained(path)
    except ImportError as e:  # transformers < ~5.2x routes this processor through torchvision
        pytest.skip("this transformers cannot load a PaddleOCR-VL processor: " + " ".join(str(e).split())[:100])


def test_second_family_trains_through_student_and_teacher_flags(tmp_path):
    save_tiny_paddleocr_vl(tmp_path / "student", 32, seed=0)
    save_tiny_paddleocr_vl(tmp_path / "teacher", 64, seed=1)
    proc = run_script("--preset", "smoke", "--out", str(tmp_path / "runs"), "--device", "cpu", "--steps", "2",
                      "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                      "--max-new-tokens", "6", "--dtype", "bf16", "--micro-batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1" not in proc.stdout and "rl-kepo" in proc.stdout
    run = tmp_path / "runs" / "smoke-student-seed1" / "rl-kepo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["hint_groups"] > 0 and all(math.isfinite(m["loss"]) for m in lines)
    config = json.loads((run / "results.json").read_text())["kepo_config"]
    assert config["max_new_tokens"] == 6 and config["micro_batch_size"] == 4


def test_checkpoints_load_in_fp32_whatever_dtype_they_were_saved_in(tmp_path):
    """transformers 5 keeps a checkpoint's own dtype (Qwen3-VL's is bf16); a student trained in bf16 weights would
    not move at the paper's lr of 1e-6. Teacher and reference load in --dtype."""
    tiny_vlm(make_tokenizer()).to(torch.bfloat16).save_pretrained(tmp_path)
    assert {p.dtype for p in ts.load_model(str(tmp_path), "cpu", "").parameters()} == {torch.float32}
    assert {p.dtype for p in ts.load_model(str(tmp_path), "cpu", "", torch.bfloat16).parameters()} == {torch.bfloat16}


def test_a_chat_checkpoint_is_asked_in_words(tmp_path):
    """The second family has a chat template: the student, teacher and hinted prompts carry the instructions."""
    save_tiny_paddleocr_vl(tmp_path / "student", 32, seed=0)
    proc = AutoProcessor.from_pretrained(str(tmp_path / "student"))
    exs = ts.make_split(1, "train", "mri", 2)
    hints = ts.hint_prompts(exs, proc, "cpu")
    batches = {ts.STUDENT_ASK: ts.student_prompts(proc, exs, "cpu"),
               ts.HINTED_ASK.format(hint="size large", letter=exs[1].answer): hints.hinted([1], ["size large"]),
               ts.TEACHER_ASK.format(letter=exs[0].answer, truth=exs[0].truth): hints.request([0])}
    tok = proc.tokenizer
    for instruction, batch in batches.items():
        tokens = " ".join(tok.convert_ids_to_tokens(batch.input_ids[-1]))
        assert " ".join(tok.tokenize(instruction)) in tokens and tok.unk_token not in tokens
    assert ts.prompt_text(exs[0]) == f"{exs[0].question} options " + " , ".join(
        f"{o} {'abcd'[i]}" for i, o in enumerate(exs[0].options))  # the toy keeps its bare layout


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--batch-prompts", "-1"], "--batch-prompts must be >= 1"),
    (["--steps", "-1"], "--steps and --micro-batch must be >= 0"),
    (["--tau", "5"], "--tau must be in \\[0, 2\\]"),
    (["--method", "ppo"], "argument --method: invalid choice"),
    (["--student", "nowhere", "--teacher", "nowhere"], "--student nowhere: not a checkpoint folder"),
    (["--student", "."], "--student and --teacher go together"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    (["--shard"], "--shard needs torchrun with 2 or more processes"),
    (["--device", "tpu"], "--device tpu: auto, cpu, cuda\\[:N\\]"),
    pytest.param(["--device", "cuda"], "--device cuda: .* sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_flags_are_refused_in_one_line_before_any_work(tmp_path, flags, message):
    proc = run_script("--preset", "smoke", "--out", str(tmp_path), *flags, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("train_small.py: error: ") and re.search(message, lines[-1]), lines
    assert not any(tmp_path.iterdir())  # nothing was written


def test_batch_prompts_must_divide_among_torchrun_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it, before the flags are checked
    a = replace(ts.Args(**ts.PRESETS["smoke"]), batch_prompts=4)
    assert ts.check_args(a) == "--batch-prompts 4 must divide among 3 processes"
    assert ts.check_args(replace(a, batch_prompts=6)) is None


def write_jsonl(folder, per_modality=12):
    """Toy questions as image files and OmniMedVQA-style records (upper-case answer letters)."""
    lines = []
    for m in ("mri", "ct", "xray"):
        for i, e in enumerate(ts.make_split(5, "jsonl", m, per_modality)):
            name = f"{m}_{i}.png"
            ts.draw(e.case).save(folder / name)
            lines.append(json.dumps({"image": name, "question": e.question, "options": list(e.options),
                                     "answer": e.answer.upper(), "modality": m, "qtype": e.qtype}))
    path = folder / "omni.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_jsonl_data_trains_and_evaluates_every_modality(tmp_path):
    path, _ = write_jsonl(tmp_path)
    proc = run_script("--preset", "smoke", "--out", str(tmp_path / "runs"), "--device", "cpu", "--steps", "2",
                      "--data", str(path), "--train-modality", "ct")
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if "ct*" in line)
    assert "mri" in header and "xray" in header and "fundus" not in header
    res = json.loads((tmp_path / "runs" / "smoke-omni-seed1" / "rl-kepo" / "results.json").read_text())
    assert set(ts.MODALITIES) & set(res) == {"ct", "mri", "xray"}
    stage = json.loads((tmp_path / "runs" / "smoke-omni-teacher" / "stage.json").read_text())
    assert len(stage["config"]["data"]) == 12  # the teacher is tied to this file's content


@pytest.mark.parametrize("line,edit,message", [
    (2, lambda r: r.pop("options"), "missing fields \\['options'\\]"),
    (3, lambda r: r.update(answer="E"), "answer 'E' is not one of the letters"),
    (5, lambda r: r.update(image="gone.png"), "gone.png cannot be read"),
    (4, lambda r: r.update(options=["only one"]), "options must be"),
    (6, None, "invalid JSON"),
])
def test_bad_jsonl_record_names_file_and_line(tmp_path, line, edit, message):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    if edit is None:
        lines[line - 1] = "{not json"
    else:
        record = json.loads(lines[line - 1])
        edit(record)
        lines[line - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}"):
        ts.load_jsonl(str(path))


def test_truncated_image_is_refused_at_the_check_with_file_and_line(tmp_path):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    image = tmp_path / json.loads(lines[3])["image"]
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])  # the header is intact: Image.open alone accepts it
    with ts.Image.open(image):
        pass
    with pytest.raises(ValueError, match=f"{path}:4: image .*{image.name} cannot be read"):
        ts.load_jsonl(str(path))


@pytest.mark.skipif(not os.environ.get("KEPO_BENCH"), reason="image check benchmark: set KEPO_BENCH=1 (minutes)")
def test_image_check_benchmark_10000_images(tmp_path):
    """README "--data": the JSONL check on 10,000 images, every one decoded: 48x48 PNGs, then 512x512 JPEGs."""
    exs = ts.make_split(9, "bench", "mri", 10_000)
    for size, ext in ((48, "png"), (512, "jpg")):
        lines = []
        for i, e in enumerate(exs):
            ts.draw(e.case).resize((size, size)).save(tmp_path / f"{i}.{ext}")
            lines.append(json.dumps({"image": f"{i}.{ext}", "question": e.question, "options": list(e.options),
                                     "answer": e.answer, "modality": "mri", "qtype": e.qtype}))
        path = tmp_path / f"{ext}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        assert len(ts.load_jsonl(str(path))) == len(exs)
        print(f"\n10,000 {size}x{size} {ext}: checked in {time.perf_counter() - start:.1f} s")


def test_jsonl_test_split_is_the_same_for_every_seed_and_apart_from_the_teachers_pool(tmp_path):
    path, _ = write_jsonl(tmp_path)
    splits = [ts.jsonl_data(ts.Args(**ts.PRESETS["smoke"], data=str(path), seed=seed, out=str(tmp_path)))
              for seed in (1, 2, 3)]
    key = lambda e: (e.image, e.question)  # noqa: E731
    for data in splits:
        assert not {key(e) for e in data.test} & {key(e) for e in data.pool}
        assert [key(e) for e in data.test] == [key(e) for e in splits[0].test]
    assert len(splits[0].test) == 3 * 2 and len(splits[0].pool) == 3 * 10  # 20% of 12 per modality held out


def test_bad_jsonl_stops_the_cli_before_training(tmp_path):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    path.write_text("\n".join(lines[:2] + ["{}"] + lines[3:]) + "\n")
    proc = run_script("--preset", "smoke", "--out", str(tmp_path / "runs"), "--device", "cpu", "--data", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"train_small.py: error: {path}:3: missing fields")
    assert not (tmp_path / "runs" / "smoke-omni-teacher").exists()


if __name__ == "__main__":  # torchrun runs this file as the DDP or sharded worker
    if "--worker" in sys.argv:
        distributed_worker(sys.argv[sys.argv.index("--worker") + 1])
    elif "--memory-worker" in sys.argv:  # the memory benchmark runs each setting in its own process
        size = sys.argv[sys.argv.index("--memory-worker") + 1]
        memory_worker(None if size == "all" else int(size))
