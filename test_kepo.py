"""Tests. kepo.py's first, in its order, needing nothing else (they travel with kepo.py):
maths against independent computations, the step against eq. 7 by hand, KEPO's rules on
a scripted policy, two processes (DDP, FSDP2) against one. Then train_small.py's."""
import datetime
import doctest
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as tr
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch.nn.utils.rnn import pad_sequence

import kepo

# ---- Factories: tokenizer, tiny VLMs, prompts, rollouts, scripted policy, step ----
WORDS = "what finding is shown options a b c d look at lesion large small round answer hint".split()
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
N_IMG = 4  # image tokens per prompt: a 16x16 image in 8x8 patches
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))]
ATOL = {"cpu": 1e-5, "cuda": 1e-4}  # cuDNN may pick TF32 for the patch embedding

def make_tokenizer(specials=None, words=WORDS, padding_side="left"):
    """A word-level tokenizer; specials {name: token} include image_token."""
    specials = specials or {"image_token": "<image>"}
    vocab = dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", *specials.values(), *words])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = tr.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side=padding_side, extra_special_tokens=specials)
    tok.add_tokens(TAGS)  # whole, and decoded
    return tok

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()

def tiny_vlm(tok, hidden=32, seed=0):
    torch.manual_seed(seed)
    vision = tr.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8)
    text = tr.Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1, intermediate_size=2 * hidden,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    return tr.LlavaForConditionalGeneration(tr.LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=N_IMG,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full"))

def prompt_batch(tok, texts, device="cpu"):
    enc = tok(["<image> " * N_IMG + t for t in texts], return_tensors="pt", padding=True)
    pixels = torch.randn(len(texts), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return on(kepo.PromptBatch(enc.input_ids, enc.attention_mask, {"pixel_values": pixels}), device)

def on(batch, device):
    vision = {k: v.to(device) for k, v in batch.vision.items()}
    return kepo.PromptBatch(batch.input_ids.to(device), batch.attention_mask.to(device), vision)

def rollouts_of(tok, n=8, length=5, seed=0):
    """n rollouts of random words, lengths 1..length, over two prompts in turn."""
    prompts = prompt_batch(tok, ["what finding is shown options a b", "what is shown"])
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(WORDS), (n, length), generator=gen)
    ids = torch.tensor(tok.convert_tokens_to_ids(WORDS))[pick]
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=gen)).int()
    return kepo.Rollouts(prompts.select([i % 2 for i in range(n)]), ids, mask, [""] * n)

def answer(letter):
    return f"<think> look </think> <answer> {letter} </answer>"

class ScriptedVLM(torch.nn.Module):
    """A tiny LLaVA whose `generate` writes rule(row, prompt ids), not samples; it records
    each call's batch size and settings."""

    def __init__(self, tok, rule, hidden=32, seed=0, logit_offset=0.0):
        super().__init__()
        self.model, self.tok, self.rule, self.calls = tiny_vlm(tok, hidden, seed), tok, rule, []
        self.config, self.offset, self.settings = self.model.config, logit_offset, []
        self.generation_config = self.model.generation_config

    def forward(self, **kwargs):
        self.calls.append(("forward", len(kwargs["input_ids"])))
        out = self.model(**kwargs)
        out.logits = out.logits + self.offset  # the same policy: softmax ignores it
        return out

    def generate(self, input_ids, **kwargs):
        self.calls.append(("generate", len(input_ids)))
        self.settings.append(kwargs)
        texts = [self.rule(i, row) for i, row in enumerate(input_ids.tolist())]
        seqs = [torch.tensor(self.tok(t).input_ids + [self.tok.eos_token_id]) for t in texts]
        return torch.cat([input_ids, pad_sequence(seqs, True, self.tok.pad_token_id)], 1)

def scripted_step(tok, answers=("b", "a"), teacher_rule=lambda i, row: "<hint> look </hint>",
                  bare=lambda i: answer("c"), **cfg):
    """A step's pieces: a student right with a hint (the letter after "answer"), else
    bare(row); a teacher, prompts, hint prompts, a config."""
    hint, word = tok.convert_tokens_to_ids("hint"), tok.convert_tokens_to_ids("answer")
    student = ScriptedVLM(tok, lambda i, row: answer(
        tok.decode(row[row.index(word) + 1])) if hint in row else bare(i))
    teacher, prompts = ScriptedVLM(tok, teacher_rule, 48, 1), prompt_batch(tok, ["what"] * 2)
    hints = kepo.HintPrompts(prompts.select, lambda idx, h: prompt_batch(
        tok, [f"hint {x} answer {answers[i]}" for i, x in zip(idx, h)]))
    config = kepo.KEPOConfig(**{"group_size": 4, "max_new_tokens": 8, "max_attempts": 1, **cfg})
    return student, teacher, prompts, hints, config

def step(student, tok, prompts, cfg, method="kepo", teacher=None, ref=None, hints=None,
         trace=None, answers=("B", "A"), lr=0.0):
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    return kepo.kepo_step(student, opt, tok, prompts, list(answers), cfg, method, teacher, ref,
                          hints, trace)

def hand_jsd(s_logits, t_logits, beta, temperature):
    """Per-token generalized JSD from probabilities, independently of kepo.py."""
    p_s = torch.softmax(s_logits.double() / temperature, -1)
    p_t = torch.softmax(t_logits.double() / temperature, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa
    if beta in (0, 1):
        return kl(p_t, p_s) if beta == 0 else kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)

def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

# ---- 1. Generation ----
def test_completion_mask_and_a_turns_end_ids():
    """The mask ends at the first stop id; a chat turn ends at generation_config's ids too
    (Gemma's <end_of_turn>), never suppressed."""
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [9, 7, 6, 2, 2]])
    assert kepo.completion_mask(ids, [2]).tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1] * 4 + [0]]
    assert kepo.completion_mask(ids, [2, 7]).tolist()[2:] == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    tok = make_tokenizer({"image_token": "<image>", "eot_token": "<end_of_turn>"})
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    model = ScriptedVLM(tok, lambda i, row: answer("b") + " <end_of_turn> look look")
    model.generation_config.eos_token_id = [tok.eos_token_id, eot]
    assert eot in kepo.stop_ids(tok, model) and eot not in kepo.suppressed_ids(tok, model)
    out = kepo.generate_rollouts(model, tok, prompt_batch(tok, ["what"]), 2, kepo.KEPOConfig(), [])
    assert out.completion_ids[0][out.completion_mask[0].bool()][-1] == eot
    assert out.texts == [answer("b")] * 2 and kepo.format_reward(out.texts).tolist() == [1, 1]

def test_index_vision_and_sampling_never_emits_a_suppressed_id(tok):
    pv = torch.arange(3)[:, None, None, None].expand(3, 3, 2, 2).float()
    assert kepo.index_vision({"pixel_values": pv}, torch.tensor([2, 2, 0]))[
        "pixel_values"][:, 0, 0, 0].tolist() == [2, 2, 0]
    grid = torch.tensor([[1, 2, 2], [1, 1, 2], [1, 2, 1]])  # 4, 2 and 2 patches
    patches = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]).float()[:, None]
    out = kepo.index_vision({"pixel_values": patches, "image_grid_thw": grid}, torch.tensor([1, 1, 0]))
    assert out["pixel_values"].squeeze(1).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out["image_grid_thw"].tolist() == [[1, 1, 2], [1, 1, 2], [1, 2, 2]]
    model, prompts = tiny_vlm(tok), prompt_batch(tok, ["what is shown", "look"])
    suppress = kepo.suppressed_ids(tok, model)
    assert tok.convert_tokens_to_ids("<image>") in suppress and tok.eos_token_id not in suppress
    r = kepo.generate_rollouts(model, tok, prompts, 3, kepo.KEPOConfig(max_new_tokens=8), suppress)
    assert torch.equal(r.prompts.input_ids[3], prompts.input_ids[1])  # prompts repeated in place
    assert not torch.isin(r.completion_ids[r.completion_mask.bool()], torch.tensor(suppress)).any()
    with pytest.raises(ValueError, match="left-padded"):
        right = prompt_batch(make_tokenizer(padding_side="right"), ["what", "what is shown"])
        kepo.generate_rollouts(model, tok, right, 2, kepo.KEPOConfig(), [])

def scoring_matches_generate(model, tok, rows, device="cpu"):
    """Does one scoring forward reproduce `generate`'s logits (left padding too)?"""
    suppress = kepo.suppressed_ids(tok, model)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=rows.input_ids, attention_mask=rows.attention_mask, **rows.vision,
        do_sample=True, top_k=0, max_new_tokens=5, min_new_tokens=5, pad_token_id=0,
        eos_token_id=2, suppress_tokens=suppress, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[:, rows.input_ids.shape[1]:]
    r = kepo.Rollouts(rows, ids, torch.ones_like(ids, dtype=torch.int), [""] * len(ids))
    expected = torch.stack(out.logits, 1).index_fill(-1, torch.tensor(suppress, device=device), -1e9)
    return torch.allclose(kepo.completion_logits(model, r, suppress), expected, atol=ATOL[device])

@pytest.mark.parametrize("device", DEVICES)
def test_scoring_reproduces_generate_logits(tok, device):
    prompts = prompt_batch(tok, ["what finding is shown options a b c d look", "what"], device)
    assert (prompts.attention_mask == 0).any()  # one prompt is left-padded
    model = tiny_vlm(tok).to(device)
    assert scoring_matches_generate(model, tok, prompts.select([0, 0, 1, 1]), device)

# other families' tiny towers
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=56, patch_size=14)

def tiny_qwen2_vl(seed=0, device="cpu"):
    """A Qwen2-VL (flattened patches, image_grid_thw, mm_token_type_ids), inputs by hand."""
    tok = make_tokenizer(
        {"image_token": "<|image_pad|>", "start": "<|vision_start|>", "end": "<|vision_end|>"})
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    torch.manual_seed(seed)
    model = tr.Qwen2VLForConditionalGeneration(tr.Qwen2VLConfig(
        text_config=TEXT | dict(vocab_size=len(tok), max_position_embeddings=256,
                                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids[0], video_token_id=3, vision_start_token_id=ids[1],
        vision_end_token_id=ids[2]))
    processor = getattr(tr, "Qwen2VLImageProcessorPil", None) or tr.Qwen2VLImageProcessor
    try:
        images = processor(min_pixels=56 * 56, max_pixels=56 * 56)(
            [Image.new("RGB", (56, 56), (i * 90, 30, 30)) for i in range(2)], return_tensors="pt")
    except ImportError as e:  # transformers 5.4 asks for torchvision even here
        pytest.skip(f"no Qwen2-VL image processor without torchvision: {str(e)[:60]}")
    n_image = (images["image_grid_thw"].prod(-1) // 4).tolist()  # 2x2 patches merge
    enc = tok([f"<|vision_start|> {'<|image_pad|> ' * n}<|vision_end|> {q}"
               for n, q in zip(n_image, ["what finding is shown options a b", "what"])],
              return_tensors="pt", padding=True)
    vision = {"pixel_values": images["pixel_values"], "image_grid_thw": images["image_grid_thw"],
              "mm_token_type_ids": (enc.input_ids == ids[0]).long()}
    prompts = kepo.PromptBatch(enc.input_ids, enc.attention_mask, vision)
    return model.to(device), tok, on(prompts, device)

@pytest.mark.parametrize("device", DEVICES)
def test_qwen2_vl_flattened_patches_score_and_train(device):
    model, tok, prompts = tiny_qwen2_vl(device=device)
    assert prompts.vision["pixel_values"].shape[0] != len(prompts.input_ids)  # not batch-first
    assert scoring_matches_generate(model, tok, prompts.select([0, 0, 1, 1]), device)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_attempts=1, tau=0.0, hint_mode="always")
    m = kepo.kepo_step(
        model, torch.optim.SGD(model.parameters(), lr=0.5), tok, prompts, ["A", "B"], cfg, "kepo",
        tiny_qwen2_vl(1, device)[0], tiny_qwen2_vl(2, device)[0],
        kepo.HintPrompts(prompts.select, lambda idx, h: prompts.select(idx)))
    assert all(map(math.isfinite, m.values())) and m["gate_frac"] == 1.0 and m["hint_groups"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

def gemma3_and_processor(seed=0, words=WORDS, template=None):
    """A tiny Gemma 3: token_type_ids mark image tokens; turns end at <end_of_turn>."""
    specials = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>", "eot_token": "<end_of_turn>"}
    tok = make_tokenizer(specials, words)
    images = getattr(tr, "Gemma3ImageProcessorPil", None) or tr.Gemma3ImageProcessor
    proc = tr.Gemma3Processor(images(size={"height": 56, "width": 56}), tok,
                              chat_template=template, image_seq_length=4)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in specials.items()}
    torch.manual_seed(seed)
    model = tr.Gemma3ForConditionalGeneration(tr.Gemma3Config(
        text_config=TEXT | dict(vocab_size=len(tok), head_dim=16, sliding_window=64),
        vision_config=VISION,
        mm_tokens_per_image=4, image_token_index=ids["image_token"],
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"]))
    model.generation_config.eos_token_id = [2, ids["eot_token"]]
    return model, proc

def paligemma_and_processor():
    """A tiny PaliGemma: token_type_ids 0 for the prefix, 1 for the suffix; its processor
    returns labels."""
    tok, images = make_tokenizer(), tr.SiglipImageProcessor(size={"height": 56, "width": 56})
    images.image_seq_length = 16
    torch.manual_seed(0)
    model = tr.PaliGemmaForConditionalGeneration(tr.PaliGemmaConfig(
        text_config=TEXT | dict(model_type="gemma", vocab_size=len(tok), head_dim=16),
        vision_config=VISION | dict(projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32))
    return model, tr.PaliGemmaProcessor(image_processor=images, tokenizer=tok)

@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_token_type_ids_are_extended_as_generate_extends_them(family):
    """0 over the completion for Gemma 3, 1 for PaliGemma's causal suffix (0 would let a token
    see its future): scoring reproduces generate."""
    model, proc = {"gemma3": gemma3_and_processor, "paligemma": paligemma_and_processor}[family]()
    if family == "paligemma" and "_update_model_kwargs_for_generation" not in vars(type(model)):
        pytest.skip("this transformers' PaliGemma generates its suffix as prefix tokens")
    image = "<start_of_image>" if family == "gemma3" else "<image>"
    enc = proc(text=[f"{image} what is shown", f"{image} what finding is shown options a b"],
               images=[[Image.new("RGB", (56, 56), (i * 90, 20, 20))] for i in range(2)],
               return_tensors="pt", padding=True)
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "labels")}
    rows = kepo.PromptBatch(enc["input_ids"], enc["attention_mask"], vision).select([0, 0, 1, 1])
    assert "token_type_ids" in vision and scoring_matches_generate(model, proc.tokenizer, rows)

# ---- 2-4. Reward, advantages, gate, teacher divergence ----
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

@pytest.mark.parametrize("text,letter,fmt,acc", REWARD_TABLE)
def test_malformed_completions_score_zero(text, letter, fmt, acc):
    assert kepo.format_reward([text]).item() == fmt
    assert kepo.accuracy_reward([text], [letter]).item() == acc

def test_advantages_clipping_and_the_gate_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    g = r[:4].tolist()
    expected = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for x in g] + [0.0] * 4
    assert torch.allclose(kepo.group_advantages(r, 4), torch.tensor(expected), atol=1e-6)
    for bad in (1, 3):
        with pytest.raises(ValueError, match="group_size"):
            kepo.group_advantages(r, bad)
    assert kepo.quality_gate(r[:4], 1.0).tolist() == [False, True, True, True]
    assert kepo.quality_gate(r[:4], 2.0).tolist() == [False, False, True, False]
    # ratios e^0.5 > 1 + eps and e^-0.5 < 1 - eps: each side clips one sign of A
    logps = torch.tensor([0.5, 0.5, -0.5, -0.5])[:, None].repeat(1, 2).requires_grad_()
    loss = kepo.policy_loss(logps, torch.zeros(4, 2), torch.tensor([1.0, -1.0, 1.0, -1.0]),
                            torch.ones(4, 2), 0.2, None, 0.0)
    loss.backward()
    up, down = math.exp(0.5), math.exp(-0.5)
    assert math.isclose(loss.item(), (-1.2 + up - down + 0.8) / 4, rel_tol=1e-6)
    assert torch.allclose(logps.grad.sum(1), torch.tensor([0, up, -down, 0]) / 4)

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_hand_computation(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = (hand_jsd(s, t, beta, temperature) * mask).sum() / mask.sum()
    got = kepo.generalized_jsd(s, t, mask, beta, temperature).double()
    assert torch.allclose(got, expected, atol=1e-5)

def test_generalized_jsd_chunks_endpoints_bounds_and_edge_cases(monkeypatch):
    t, mask, results = torch.randn(3, 5, 11), (torch.rand(3, 5) < 0.7).float(), []
    for chunk in (1000, 2):  # one pass, then 2 tokens a chunk
        monkeypatch.setattr(kepo, "JSD_CHUNK_TOKENS", chunk)
        s = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2), requires_grad=True)
        loss = kepo.generalized_jsd(s, t, mask, 0.3, 0.7)
        loss.backward()
        results.append((loss.item(), s.grad))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-7, rtol=0)
    s, ones = torch.randn(2, 4, 7), torch.ones(2, 4)
    forward = F.kl_div(  # KL(teacher || student): GKD's beta = 0
        s.log_softmax(-1), t[:2, :4, :7].log_softmax(-1), reduction="sum", log_target=True) / 8
    assert torch.allclose(kepo.generalized_jsd(s, t[:2, :4, :7], ones, 0.0, 1.0), forward, atol=1e-6)
    assert kepo.generalized_jsd(s, s * 50, ones, 0.5, 1.0) <= math.log(2) + 1e-6
    s.requires_grad_(True)
    empty = kepo.generalized_jsd(s, t[:2, :4, :7], torch.zeros(2, 4), 0.5, 1.0)
    empty.backward()
    assert empty.item() == 0.0 and (s.grad == 0).all()
    s2, t2 = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    s2[..., 0] = t2[..., 0] = -1e9  # a suppressed id, masked as completion_logits masks it
    assert torch.isfinite(kepo.generalized_jsd(s2, t2, torch.ones(1, 2), 0.5, 1.0))

# ---- 7. Loss and step: eq. 7 against a hand computation ----
def hand_loss(student, teacher, ref, r, rewards, method, cfg, suppress):
    """Eq. 7 (negated) written out: a plain forward, suppressed ids dropped (probability 0),
    sums over rows and tokens by hand."""
    allowed = torch.tensor([i for i in range(student.config.text_config.vocab_size)
                            if i not in suppress])
    ids = torch.searchsorted(allowed, r.completion_ids)  # each id's place among the allowed

    def logits(model):
        out = model(input_ids=torch.cat([r.prompts.input_ids, r.completion_ids], 1),
                    attention_mask=torch.cat([r.prompts.attention_mask, r.completion_mask], 1),
                    **r.prompts.vision).logits
        return out[:, r.prompts.input_ids.shape[1] - 1:-1][..., allowed]
    s = logits(student)
    logp = (s / cfg.temperature).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    with torch.no_grad():
        t = logits(teacher)
        ref_logp = (logits(ref) / cfg.temperature).log_softmax(-1).gather(-1, ids[..., None])
    groups = rewards.view(-1, cfg.group_size).tolist()
    adv = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in groups for x in g]
    total, jsd_sum, gated_tokens = 0.0, 0.0, 0
    for i in range(len(rewards)):
        n = int(r.completion_mask[i].sum())
        a = 0.0 if method == "opd" else adv[i]
        d = ref_logp[i, :n, 0] - logp[i, :n]
        ratio = torch.exp(logp[i, :n] - logp[i, :n].detach())
        total = total + (-a * ratio + cfg.beta_rl * (torch.exp(d) - d - 1)).sum() / n / len(rewards)
        if method == "opd" or method != "grpo" and rewards[i] >= cfg.tau:
            jsd_sum = jsd_sum + hand_jsd(s[i, :n], t[i, :n], cfg.beta_jsd, cfg.jsd_temperature).sum()
            gated_tokens += n
    return total + cfg.distill_coef * jsd_sum / max(gated_tokens, 1)

@pytest.mark.parametrize("method", kepo.METHODS)
def test_the_step_loss_and_gradient_equal_eq7_by_hand(tok, method):
    """kepo_backward at non-default temperature, beta_jsd, jsd_temperature, distill_coef,
    beta_rl, micro-batches of 3, is eq. 7 by hand for each method (lengths differ)."""
    r, rewards = rollouts_of(tok, seed=3), torch.tensor([2.0, 0, 1, 0, 2, 2, 0, 1])
    cfg = kepo.KEPOConfig(group_size=4, temperature=0.7, beta_jsd=0.3, jsd_temperature=1.5,
                          distill_coef=0.5, beta_rl=0.1, micro_batch_size=3)
    teacher, ref, student, twin = (tiny_vlm(tok, h, s) for h, s in ((48, 1), (32, 2), (32, 0), (32, 0)))
    suppress = kepo.suppressed_ids(tok, teacher)
    parts = kepo.kepo_backward(student, teacher, r, rewards, method, cfg, ref, suppress)
    expected = hand_loss(twin, teacher, ref, r, rewards, method, cfg, suppress)
    expected.backward()
    assert parts["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(grads(student), grads(twin), atol=2e-6) and grads(twin).abs().max() > 1e-3

def test_micro_batches_give_one_pass_and_bf16_models_keep_fp32_maths(tok):
    """Forwards of 1, 3 and N rows (one gating nothing) give one pass's loss and gradient; bf16
    models a distillation term within 1% of fp32 (fp32 maths)."""
    r, rewards, teacher = rollouts_of(tok), torch.tensor([2.0, 0, 1, 0, 0, 0, 2, 1]), tiny_vlm(tok, 48, 1)
    results, rows = [], []
    for size in (None, 1, 3, 8):
        student = tiny_vlm(tok)
        student.register_forward_pre_hook(
            lambda m, a, k: rows.append(len(k["input_ids"])), with_kwargs=True)
        cfg = kepo.KEPOConfig(group_size=2, micro_batch_size=size)
        parts = kepo.kepo_backward(student, teacher, r, rewards, "kdpo", cfg, None, [])
        results.append((parts, grads(student)))
    assert rows == [8] + [1] * 8 + [3, 3, 2, 8]
    for parts, grad in results[1:]:
        assert parts["loss"] == pytest.approx(results[0][0]["loss"], abs=1e-6)
        assert (grad - results[0][1]).abs().max() < 1e-6
    vision = {"pixel_values": r.prompts.vision["pixel_values"].bfloat16()}
    r16 = replace(r, prompts=kepo.PromptBatch(r.prompts.input_ids, r.prompts.attention_mask, vision))
    bf16 = kepo.kepo_backward(tiny_vlm(tok).bfloat16(), teacher.bfloat16(), r16, rewards, "kdpo",
                              kepo.KEPOConfig(group_size=2), None, [])
    assert bf16["distill_loss"] == pytest.approx(results[0][0]["distill_loss"], rel=0.01)

def test_config_and_step_refuse_what_would_mean_something_else(tok):
    """Each field's rule refuses a finite bad value (each field has one); NaN, inf too."""
    bad = [("group_size", 1), ("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5),
           ("max_new_tokens", 0), ("max_hint_tokens", 0), ("clip_eps", -0.2), ("beta_rl", -0.1),
           ("tau", 3.0), ("tau", -1.0), ("beta_jsd", 1.5), ("jsd_temperature", 0.0),
           ("distill_coef", 0.0), ("num_hinted", 0), ("num_hinted", 9), ("max_attempts", 0),
           ("hint_mode", "adaptve"), ("cliff_trigger", "format"), ("max_grad_norm", 0.0),
           ("micro_batch_size", 0)]
    assert {name for name, _ in bad} == {f.name for f in fields(kepo.KEPOConfig)}
    nan, inf = float("nan"), float("inf")
    for name, value in bad + [("tau", None), ("temperature", nan), ("beta_rl", inf)]:
        with pytest.raises((ValueError, TypeError), match=f"KEPOConfig.{name}=|not supported"):
            kepo.KEPOConfig(**{name: value})
    student, teacher, prompts, hints, cfg = scripted_step(tok)
    for method, kwargs, why in [
            ("ppo", {}, "method must"), ("kepo", {}, "needs a teacher"),
            ("kepo", {"teacher": teacher}, "needs hint_prompts"),
            ("grpo", {"cfg": replace(cfg, beta_rl=0.1)}, "ref_model")]:
        with pytest.raises(ValueError, match=why):
            step(student, tok, prompts, **{"cfg": cfg, "method": method} | kwargs)
    assert student.calls == []  # refused before any sampling

def test_the_kl_to_a_reference_is_finite_after_early_eos(tok):
    """Pad positions hold suppressed ids near -1e9 (a float32 step is 128): unmasked, a
    policy's KL to itself would be NaN. For grpo and opd (it keeps beta_rl)."""
    rule = lambda i, row: answer("b") if i % 2 else answer("c") + " look at lesion"  # noqa
    student, ref = ScriptedVLM(tok, rule, logit_offset=300.0), ScriptedVLM(tok, rule)
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=12, beta_rl=0.1)
    for method in ("grpo", "opd"):
        m = step(student, tok, prompt_batch(tok, ["what"] * 2), cfg, method, ref, ref)
        assert m["completions/mean_length"] < 12 and m["kl"] == pytest.approx(0, abs=1e-5)
        assert math.isfinite(m["loss"])

def test_the_step_samples_with_the_configs_settings(tok):
    """Rollouts, hints, hinted samples: the config's temperature, top_p (top_k off), token
    caps, stop and suppressed ids; greedy is greedy."""
    student, teacher, prompts, hints, cfg = scripted_step(
        tok, temperature=0.7, top_p=0.8, max_new_tokens=9, max_hint_tokens=3)
    step(student, tok, prompts, cfg, "kepo", teacher, None, hints)
    sampled = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=0, eos_token_id=[2],
                   pad_token_id=0, synced_gpus=False,
                   suppress_tokens=kepo.suppressed_ids(tok, student))
    used = lambda m: [{k: s.get(k) for k in [*sampled, "max_new_tokens"]} for s in m.settings]  # noqa
    assert used(student) == [sampled | {"max_new_tokens": 9}] * 2  # rollouts, hinted samples
    assert student.settings[0]["attention_mask"].shape == (8, 5)
    assert used(teacher) == [sampled | {"max_new_tokens": 3}]
    kepo.generate_rollouts(student, tok, prompts, 1, cfg, [], greedy=True)
    assert student.settings[-1]["do_sample"] is False and "top_p" not in student.settings[-1]

def test_the_step_zeroes_clips_and_applies_its_gradient(tok, monkeypatch):
    """A step's gradient is its own (zeroed first), clipped to max_grad_norm (grad_norm: the
    norm before), applied; a phase's clock starts where the last ended."""
    clock = iter(range(100))
    monkeypatch.setattr(kepo, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    student, teacher, prompts, hints, cfg = scripted_step(tok, max_grad_norm=1e-3)
    runs = [step(student, tok, prompts, cfg, "kepo", teacher, None, hints) | {"grad": grads(student)}
            for _ in range(2)]
    assert runs[0]["grad_norm"] == runs[1]["grad_norm"] > 1e-2
    assert torch.equal(runs[0]["grad"], runs[1]["grad"])
    assert torch.linalg.vector_norm(runs[1]["grad"]).item() == pytest.approx(1e-3, rel=1e-4)
    assert all(runs[1][f"time/{k}"] == 1 for k in ("generate", "hints", "loss_backward"))
    before = [p.detach().clone() for p in student.parameters()]
    step(student, tok, prompts, cfg, "kepo", teacher, None, hints, lr=1.0)
    moved = torch.cat([(b - p.detach()).flatten()
                       for b, p in zip(before, student.parameters()) if p.grad is not None])
    assert torch.allclose(moved, grads(student), rtol=0, atol=1e-7) and moved.abs().max() > 1e-6

@pytest.mark.parametrize("trigger", kepo.CLIFF_TRIGGERS)
def test_rule_hints_trigger_per_group_on_the_cliff(tok, trigger):
    """Group 0 right, group 1 formatted but wrong (r = 1): a cliff for "accuracy", not the
    authors' "reward" (all r = 0). "adaptive" hints cliff groups, "always" both; kepo only."""
    for method in kepo.METHODS:
        for mode, hinted in (("adaptive", int(trigger == "accuracy")), ("always", 2)):
            student, teacher, prompts, hints, cfg = scripted_step(
                tok, ("c", "a"), hint_mode=mode, cliff_trigger=trigger)
            m = step(student, tok, prompts, cfg, method, teacher, None, hints, answers="CA")
            asked = [n for call, n in teacher.calls if call == "generate"]
            assert asked == [hinted] * (method == "kepo" and hinted > 0)
            assert m.get("hint_groups", 0) == hinted * (method == "kepo")
    acc, fmt = torch.tensor([0.0, 0, 1, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert kepo.cliff_groups(acc, acc + fmt, 2, trigger) == ([0, 2] if trigger == "accuracy" else [2])

def test_hinted_samples_of_different_lengths_keep_their_own_tokens(tok):
    """Padded to one length in their call, each keeps its tokens and stop id only."""
    student = ScriptedVLM(tok, lambda i, row: answer("b") + " look" * (2 * i))
    cfg = kepo.KEPOConfig(group_size=4, num_hinted=3, max_attempts=1)
    drawn = kepo.rejection_sample(student, tok, prompt_batch(tok, ["hint"]), ["B"], cfg, [])[0]
    assert [s.ids.tolist() for s in drawn] == [tok(s.text).input_ids + [2] for s in drawn]
    assert [len(s.ids) for s in drawn] == [7, 9, 11]

def test_rule_injection_keeps_the_hint_free_prompt_and_the_trace_is_the_steps(tok):
    """Correct hinted samples replace a group's lowest-reward rows, hint-free prompt kept,
    rescored (r = 2, A > 0). The trace is the step's: advantages from its rewards, gated
    r >= tau (opd: all, grpo: none), per-token JSDs summing to the JSD sum."""
    for method in kepo.METHODS:  # rows 0 and 4 unformatted (r = 0), the rest r = 1
        student, teacher, prompts, hints, cfg = scripted_step(
            tok, bare=lambda i: "c" if i % 4 == 0 else answer("c"), tau=2.0)
        trace = {}
        m = step(student, tok, prompts, cfg, method, teacher, None, hints, trace)
        r, rewards = trace["rollouts"], trace["rewards"]
        groups = rewards.view(2, 4).tolist()
        adv = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in groups for x in g]
        assert torch.allclose(trace["advantages"], torch.tensor(adv) * (method != "opd"), atol=1e-6)
        gate = {"grpo": rewards > 9, "opd": rewards > -9}.get(method, rewards >= 2)
        assert torch.equal(trace["gate"], gate) and m["gate_frac"] == gate.float().mean()
        assert [len(t) for t in trace["jsd"]] == r.completion_mask[gate].sum(1).tolist()
        jsd_sum = sum(t.sum().item() for t in trace["jsd"])
        assert jsd_sum == pytest.approx(m["distill_loss"] * r.completion_mask[gate].sum().item())
        assert ("replaced" in trace) == (method == "kepo")
    assert trace["replaced"] == {
        0: (0, 0, "c"), 1: (0, 1, answer("c")), 4: (1, 0, "c"), 5: (1, 1, answer("c"))}
    assert rewards.tolist() == [2, 2, 1, 1, 2, 2, 1, 1] and m["hint_injected"] == 4
    assert (trace["advantages"][rewards == 2] > 0).all() and m["distill_loss"] > 0
    assert [r.texts[i] for i in (0, 1, 4, 5)] == [s.text for g in (0, 1) for s in trace["hinted"][g]]
    assert torch.equal(r.prompts.input_ids, prompts.select([0] * 4 + [1] * 4).input_ids)
    assert trace["hints"] == {0: "look", 1: "look"}

# ---- KEPO's rules, on a scripted policy (each broken in a copy fails its test) ----
def test_rule_each_correct_hinted_sample_is_accepted_on_its_own(tok):
    """One correct sample a try of two: each is kept (all-or-nothing: none)."""
    student = ScriptedVLM(tok, lambda i, row: answer("b" if i % 2 == 0 else "c"))
    for k, attempts, kept in ((2, 1, 1), (2, 2, 2), (3, 1, 2), (3, 2, 3)):
        cfg = kepo.KEPOConfig(group_size=4, num_hinted=k, max_attempts=attempts)
        accepted = kepo.rejection_sample(student, tok, prompt_batch(tok, ["hint"]), ["B"], cfg, [])
        assert [s.text for s in accepted[0] if s.kept] == [answer("b")] * kept
        assert [s.correct for s in accepted[0]] == [True, False, True][:k] * attempts
    right = ScriptedVLM(tok, lambda i, row: answer("b"))  # done at the first try: no second
    kepo.rejection_sample(right, tok, prompt_batch(tok, ["hint"]), ["B"], cfg, [])
    assert right.calls == [("generate", 3)]

def test_rule_injection_replaces_distinct_failed_slots_first(tok):
    """A group's K slots are distinct rows, lowest reward first; other rows untouched."""
    seqs = [torch.full((1 + i % 3,), i + 10) for i in range(12)]
    masks = [torch.ones_like(s, dtype=torch.int) for s in seqs]
    r = kepo.Rollouts(prompt_batch(tok, [f"p{i}" for i in range(12)]), pad_sequence(seqs, True),
                      pad_sequence(masks, True), [f"t{i}" for i in range(12)])
    new = [kepo.Hinted(torch.tensor([7] * 5), "h0", True, True),
           kepo.Hinted(torch.tensor([8]), "h1", True, True)]
    rewards = torch.tensor([1.0, 0, 2, 0, 0, 0, 0, 0, 2, 1, 0, 1])
    out, replaced = kepo.inject(r, rewards, 4, {0: new, 2: new[:1]}, pad_id=99)
    assert out.texts == ["t0", "h0", "t2", "h1", *r.texts[4:8], "t8", "t9", "h0", "t11"]
    assert replaced == {1: (0, 0, "t1"), 3: (0, 1, "t3"), 10: (2, 0, "t10")}
    assert out.completion_ids[3].tolist() == [8] + [99] * 4 and out.completion_mask[1].sum() == 5
    assert out.completion_mask.dtype == r.completion_mask.dtype
    assert out.completion_ids[9].tolist() == [19] + [99] * 4  # untouched, padded with pad_id
    assert torch.equal(out.prompts.input_ids, r.prompts.input_ids)

def test_rule_the_gate_admits_r_at_least_tau_and_the_teacher_sees_only_those_rows(tok):
    """The teacher's forward covers gated rows only; an empty gate calls none, gives 0."""
    r, teacher = rollouts_of(tok), ScriptedVLM(tok, None, 48, 1)
    rewards = torch.tensor([2.0, 0, 1, 0, 0, 0, 0, 1])
    for tau, rows in ((1.0, 3), (2.0, 1), (0.0, 8)):
        teacher.calls.clear()
        m = kepo.kepo_backward(tiny_vlm(tok), teacher, r, rewards, "kdpo",
                               kepo.KEPOConfig(group_size=2, tau=tau), None, [])
        assert teacher.calls == [("forward", rows)] and m["gate_frac"] == rows / 8
    teacher.calls.clear()
    m = kepo.kepo_backward(tiny_vlm(tok), teacher, r, torch.zeros(8), "kdpo",
                           kepo.KEPOConfig(group_size=2, tau=1.0), None, [])
    assert teacher.calls == [] and m["distill_loss"] == 0.0 and math.isfinite(m["loss"])

def test_rule_a_group_without_a_hint_tag_is_not_sampled(tok):
    rule = lambda i, row: "<hint> look </hint>" if i == 0 else "look at lesion"  # noqa
    student, teacher, prompts, hints, cfg = scripted_step(tok, teacher_rule=rule)
    r = kepo.generate_rollouts(student, tok, prompts, 4, cfg, [])
    out, stats = kepo.knowledge_enhance(
        student, teacher, tok, r, torch.ones(8), ["B", "A"], [0, 1], hints, cfg, [])
    assert stats == {"hint_groups": 2, "hint_written": 1, "hint_accept_rate": 0.5, "hint_injected": 2}
    assert student.calls[-1] == ("generate", 2)  # K = 2, group 0 only
    assert out.texts == [answer("b")] * 2 + [answer("c")] * 6
    assert [kepo.extract_hint(t) for t in ("x <hint> a b </hint> y", "<hint> </hint>", "<hint>a")] \
        == ["a b", None, None]

# ---- Multi-GPU: two processes (DDP, FSDP2) step as one on the global batch ----
WORKER_TIMEOUT = 60  # seconds a rank waits in a collective, then fails

def shard(model):
    """FSDP2 as a trainer applies it: each block transformers keeps whole, then the root;
    `generate` gathers the root's weights like a forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model, reshard_after_forward=True)  # frozen models run no backward
    register_fsdp_forward_method(model, "generate")
    return model

def distributed_worker(mode):
    """`torchrun --nproc_per_node 2 test_kepo.py --worker ddp|shard`: fixed rollouts, half a
    rank; loss and gradients against one process on all."""
    from torch.distributed.tensor import DTensor
    tok, cfg = make_tokenizer(), kepo.KEPOConfig(group_size=2, micro_batch_size=3)
    teacher, r, single = tiny_vlm(tok, 48, 1), rollouts_of(tok), tiny_vlm(tok)
    rewards = torch.tensor([2.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0])  # rank 1's first chunk: none
    loss = kepo.kepo_backward(single, teacher, r, rewards, "kdpo", cfg, None, [])["loss"]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT))
    rank, student = dist.get_rank(), tiny_vlm(tok)
    if mode == "shard":
        student, teacher = shard(student), shard(teacher)
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) \
        if mode == "ddp" else student
    rows = list(range(4 * rank, 4 * rank + 4))
    mean = torch.tensor(kepo.kepo_backward(
        model, teacher, r.select(rows), rewards[rows], "kdpo", cfg, None, [])["loss"])
    dist.all_reduce(mean)
    full = torch.cat([(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).flatten()
                      for p in student.parameters() if p.grad is not None])
    diff = (full - grads(single)).abs().max().item()
    print(f"rank {rank}: loss {loss:.8f} {mode} {mean.item() / 2:.8f} max grad diff {diff:.2e}")
    assert abs(mean.item() / 2 - loss) < 1e-6 and diff < 1e-6
    if mode == "shard":
        sharded_work_differs_by_rank(tok, student, teacher, rank)
    del model
    dist.barrier()  # gloo frees finished all_reduces once the caller moves on: drain
    dist.destroy_process_group()

def sharded_work_differs_by_rank(tok, student, teacher, rank):
    """Rank 1 stops sampling first, only rank 0 has a cliff group, rank 1 is done rejection
    sampling at once: each sharded forward runs on both ranks."""
    prompts = prompt_batch(tok, ["what is shown", "look at lesion"])
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_hint_tokens=4, max_attempts=3)
    others = [i for i in range(len(tok)) if i != tok.eos_token_id] if rank == 1 else []
    out = kepo.generate_rollouts(student, tok, prompts, 2, cfg, others)
    assert rank == 0 or out.completion_ids.shape[1] == 1
    kepo.extract_hint = lambda text: "look"  # the random teacher writes no tags
    kepo.cliff_groups = lambda *args: [0] if rank == 0 else []
    m = step(student, tok, prompts, cfg, "kepo", teacher, None,
             kepo.HintPrompts(prompts.select, lambda idx, h: prompts.select(idx)))
    assert m.get("hint_groups", 0) == (1 if rank == 0 else 0), m
    kepo.accuracy_reward = lambda texts, answers: torch.full((len(texts),), float(rank == 1))
    accepted = kepo.rejection_sample(student, tok, prompts, ["a", "b"], cfg, [])
    assert [(sum(s.kept for s in a), len(a)) for a in accepted] == (
        [(0, 6), (0, 6)] if rank == 0 else [(2, 2), (2, 2)])  # no stand-in
    print(f"rank {rank}: sharded, in lockstep")

@pytest.mark.parametrize("mode", ["ddp", "shard"])
def test_two_ranks_step_as_one_process_on_the_global_batch(mode):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         os.path.abspath(__file__), "--worker", mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("max grad diff") == 2
    assert proc.stdout.count("in lockstep") == (2 if mode == "shard" else 0)

# ---- train_small.py: the toy, its stages, its command line ----
import train_small as ts  # noqa: E402  (kepo.py's tests above do not need it)

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = ["--preset", "smoke", "--device", "cpu"]

def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *args],
                          capture_output=True, text=True, timeout=300, **kwargs)

def refused(proc, message):
    """The CLI stopped with one line naming the problem (exit 2, no traceback)."""
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return proc.returncode == 2 and "Traceback" not in proc.stderr and re.search(message, last)

def metrics(root, run="rl-kepo"):
    lines = (root / "smoke-seed1" / run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_script(*SMOKE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout

def copy_of(smoke, tmp_path, drop=("rl-kepo",)):
    shutil.copytree(smoke[0], tmp_path, dirs_exist_ok=True)
    for run in drop:
        shutil.rmtree(tmp_path / "smoke-seed1" / run)
    return tmp_path

def test_smoke_pipeline_trains_at_every_step_and_the_student_reloads(smoke):
    out, stdout = smoke
    assert all(m in next(x for x in stdout.splitlines() if "mri*" in x) for m in ts.MODALITIES)
    assert re.search(r"\| base student names the organ, worst modality \(\w+\) \| [0-9.]+", stdout)
    before = json.loads((out / "smoke-seed1" / "before_rl.json").read_text())
    assert len(before["premises"]) == 6 and "| chance |" in stdout and "too small for" in stdout
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(m["grad_norm"] > 0 and m["loss"] != 0 and m["reward_std"] > 0 and m["gate_frac"] > 0
               for m in lines) and sum(m.get("hint_groups", 0) for m in lines) > 0
    res = json.loads((out / "smoke-seed1" / "rl-kepo" / "results.json").read_text())
    assert all(0 <= res[k] <= 1 for k in ts.MODALITIES + ["OOD", "cliff_solved", "coherence/OOD"])
    trained, init = (ts.load_model(out / "smoke-seed1" / d, "cpu", "").state_dict()
                     for d in ("rl-kepo/student", "student_init"))
    assert any(not torch.equal(trained[k], init[k]) for k in init)

def test_readme_usage_snippet_runs_as_written(smoke, tmp_path):
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme[readme.index("### Using the trained student"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", 10)]
    (tmp_path / "runs").symlink_to(smoke[0])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=os.environ | {"PYTHONPATH": HERE})
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    opd = next(line for line in readme.splitlines() if line.startswith("| `opd`"))
    assert "beta_rl" in opd  # kepo.py keeps the k3 KL for opd

def test_the_rollout_log_and_page_show_every_logged_group(smoke):
    """rollouts.jsonl: each logged step's groups and loss parts; the page: every group and
    rollout, HTML in a completion (gated or not) as text, no link out."""
    import rollouts
    from html.parser import HTMLParser
    run = smoke[0] / "smoke-seed1" / "rl-kepo"
    recs = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in metrics(smoke[0])}
    assert [r["step"] for r in recs] == [s for s in (1, 2, 4, 6) for _ in range(4)]
    assert all(r["loss"] == {k: by_step[r["step"]][k] for k in r["loss"]} for r in recs)
    assert {len(r["rollouts"]) for r in recs} == {8} and any("hint" in r for r in recs)
    assert any("injected" in x for r in recs for x in r["rollouts"]) and "hinted: " in smoke[1]
    html = ["<script>", "x", "</script>", "</div>"]
    rows = [{"text": "".join(html), "tokens": 4, "accuracy": 0, "format": 0, "reward": 0,
             "advantage": 0, "gated": g, **({"token_text": html, "jsd": [0.1] * 4} if g else {})}
            for g in (False, True)]
    evil = recs[0] | {"rollouts": rows}
    for page, groups in (((run / "rollouts.html").read_text(), recs), (rollouts.page([evil]), [evil])):
        tags = []
        parser = HTMLParser()
        parser.handle_starttag = lambda tag, attrs: tags.append((tag, dict(attrs).get("class")))
        parser.feed(page)
        assert sum(t == "div" and c.startswith("group") for t, c in tags if c) == len(groups)
        assert tags.count(("tr", "rollout")) == sum(len(g["rollouts"]) for g in groups)
        assert "script" not in {t for t, _ in tags} and not re.search("https?://", page)
    assert page.count("&lt;script&gt;") == 2 and page.count("&lt;/div&gt;") == 2

def test_compare_runs_every_method_from_one_cached_student(smoke, tmp_path):
    out = copy_of(smoke, tmp_path)
    proc = run_script(*SMOKE, "--out", str(out), "--compare", "--steps", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("--resume: nothing to resume") == 4
    for name in ts.METHODS:
        assert f"| rl-{name} |" in proc.stdout and len(metrics(out, f"rl-{name}")) == 2
    assert "stages to train: none" in proc.stdout

def test_killed_run_resumes_exactly_and_never_mixes_settings(smoke, tmp_path):
    out = copy_of(smoke, tmp_path)
    flags, ckpt = [*SMOKE, "--out", str(out)], out / "smoke-seed1" / "rl-kepo" / "ckpt.pt"
    run = subprocess.Popen([sys.executable, os.path.join(HERE, "train_small.py"), *flags],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ckpt.exists() and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait() != 0 and not (ckpt.parent / "results.json").exists(), "it finished first"
    assert refused(run_script(*flags), "holds an unfinished run .*add --resume")
    other = run_script(*flags, "--resume", "--lr", "1e-2")
    assert refused(other, r"settings \(lr 0.0003 then, 0.01 now\)$")  # the difference only
    resumed = run_script(*flags, "--resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-3000:]
    assert metrics(out) == metrics(smoke[0]) and not ckpt.exists()
    log = lambda root: (root / "smoke-seed1" / "rl-kepo" / "rollouts.jsonl").read_text()  # noqa
    assert log(out) == log(smoke[0])
    a, cfg = ts.Args(**ts.PRESETS["smoke"], out=str(out)), kepo.KEPOConfig()
    settings = json.loads((ckpt.parent / "results.json").read_text())["settings"]
    assert ts.finished_or_resumable(a, ckpt.parent, settings)["settings"] == settings  # reused
    with pytest.raises(ts.UserError, match="finished with other settings .*lr 0.0003 then, 0.1 now"):
        ts.finished_or_resumable(a, ckpt.parent, settings | {"lr": 0.1})
    grpo = replace(a, method="grpo")  # the gate does not shape grpo
    assert ts.run_settings(grpo, cfg, {}) == ts.run_settings(replace(grpo, tau=2.0), cfg, {})

@pytest.mark.parametrize("flag,stages", [
    ("--teacher-steps", ["smoke-teacher"]),
    ("--base-steps", ["smoke-base", "smoke-seed1/student_init"]),
    ("--warm-steps", ["smoke-seed1/student_init"])])
def test_a_rebuilt_stage_gives_a_fresh_folders_premises(smoke, tmp_path, flag, stages):
    """A stage rebuilt with other settings: its children are refused until rebuilt too; the
    premises are a fresh folder's."""
    old, flags = copy_of(smoke, tmp_path / "old"), [*SMOKE, flag, "5", "--steps", "0"]
    for stage in stages:
        assert refused(run_script(*flags, "--out", str(old)), f"cached stage .*{stage} was built "
                       "with other settings .*steps .* then, .* now")
        shutil.rmtree(old / stage)  # as the error says
    rebuilt = run_script(*flags, "--out", str(old))
    fresh = run_script(*flags, "--out", str(tmp_path / "new"))
    table = lambda p: p[p.index("premises"):p.index("greedy")]  # noqa
    assert rebuilt.returncode == fresh.returncode == 0
    assert table(rebuilt.stdout) == table(fresh.stdout) != table(smoke[1].replace("stage 4", "greedy"))

def test_a_byte_identical_rebuild_reuses_runs_whose_files_are_checked(smoke, tmp_path):
    """A stage rebuilt to the same bytes keeps its runs (no key holds a time); a run's damaged
    file is named; a checkpoint's new weights are another input."""
    out = copy_of(smoke, tmp_path / "out", drop=())
    (out / "smoke-seed1" / "student_init" / "stage.json").unlink()
    proc = run_script(*SMOKE, "--out", str(out))
    assert "stage 3" in proc.stdout and "its results are reused" in proc.stdout, proc.stderr
    run = out / "smoke-seed1" / "rl-kepo"
    for name in ("metrics.jsonl", "student/model.safetensors"):
        kept = (run / name).read_bytes()
        (run / name).write_bytes(kept[:-1] + b"x")
        assert refused(run_script(*SMOKE, "--out", str(out)), f"{run / name} is damaged")
        (run / name).write_bytes(kept)
    save_checkpoint(tmp_path / "s", "llava", 32, 0)
    a, data = ts.Args(student=str(tmp_path / "s"), teacher=str(tmp_path / "s")), SimpleNamespace(
        fingerprint="x")
    key = ts.built_from(a, data)
    save_checkpoint(tmp_path / "s", "llava", 32, 1)
    assert ts.built_from(a, data) != key

@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--batch-prompts", "-1"], "--batch-prompts must be >= 1"),
    (["--steps", "-1"], "--steps and --micro-batch must be >= 0"),
    (["--tau", "nan"], r"--tau must be in \[0, 2\]"),
    (["--lr", "inf"], "--lr must be finite and > 0"),
    (["--teacher-lr", "1e999"], "--teacher-lr must be finite and > 0"),
    (["--seed", "99999999999999999999"], r"--seed must be in \[0, 2\*\*63\)"),
    (["--method", "ppo"], "argument --method: invalid choice"),
    (["--lr", "1", "--lr", "2"], "--lr given twice"),
    (["--compare", "--compare"], "--compare given twice"),
    (["--student", "nowhere", "--teacher", "nowhere"], "--student nowhere: not a checkpoint"),
    (["--student", "."], "--student and --teacher go together"),
    (["--data", "x.jsonl"], "--data needs --student and --teacher"),
    (["--device", "tpu"], r"--device tpu: auto, cpu or cuda\[:N\]"),
    (["--out", "a_file"], "--out a_file: cannot write"),
    (["--out", "a_file/runs"], "--out a_file/runs: cannot write there"),
    pytest.param(["--device", "cuda"], "--device cuda: .* sees no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_flags_are_refused_in_one_line_before_any_work(tmp_path, flags, message):
    (tmp_path / "a_file").write_text("")
    out = [] if "--out" in flags else ["--out", str(tmp_path / "runs")]
    proc = run_script("--preset", "smoke", *out, *flags, cwd=tmp_path)
    assert refused(proc, "^train_small.py: error: " + message), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1  # no usage block
    assert not list((tmp_path / "runs").glob("*"))

def test_help_shows_every_default():
    shown = " ".join(run_script("--help").stdout.split())
    assert all(f"(default: {f.default})" in shown for f in fields(ts.Args))

def full_disk(path):  # torch.save writes until the disk is full, then says so thus
    with open(path, "w") as f:
        f.write("the first")
    raise RuntimeError("unexpected pos 210688 vs 210576")

def test_damaged_files_are_named_and_never_trusted_and_a_full_disk_says_so(
        smoke, tmp_path, monkeypatch):
    out = copy_of(smoke, tmp_path, drop=())
    root, stage = out / "smoke-seed1", out / "smoke-teacher"
    run = root / "rl-kepo"
    for path, read in (
            (root / "before_rl.json", ts.read), (run / "results.json", ts.read),
            (run / "metrics.jsonl", ts.read_jsonl), (run / "ckpt.pt", ts.load_checkpoint),
            (stage / "stage.json", ts.read)):
        path.write_text("{")  # cut short
        with pytest.raises(ts.UserError, match=f"{path} is damaged"):
            read(path)
    assert refused(run_script(*SMOKE, "--out", str(out)), f"{stage / 'stage.json'} is damaged")
    (stage / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(ts.UserError, match=f"{stage} cannot be loaded"):
        ts.load_model(stage, "cpu", "cached stage")
    (tmp_path / "ckpt.pt").write_text("previous")
    monkeypatch.setattr(ts.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))

    def save(folder):  # a folder half written, then safetensors' error
        os.makedirs(folder)
        raise type("SafetensorError", (Exception,), {})("No space left on device")
    for name, write in (("ckpt.pt", full_disk), ("student", save)):
        with pytest.raises(ts.UserError, match=f"{name}: the disk is full"):
            ts.write_atomically(tmp_path / name, write)
    assert (tmp_path / "ckpt.pt").read_text() == "previous"
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "student").exists()
    with pytest.raises(ts.UserError, match="cannot write .*nowhere/metrics.jsonl"):
        ts.append_line(tmp_path / "nowhere" / "metrics.jsonl", "{}")

def test_toy_questions_prompts_and_pixels():
    a = ts.make_split(3, "train", "mri", 200)
    assert a == ts.make_split(3, "train", "mri", 200) != ts.make_split(4, "train", "mri", 200)
    assert {e.qtype for e in a} == set(ts.QUESTIONS)
    proc = ts.build_processor()
    for e in a:
        assert e.options[ts.LETTERS.index(e.answer)] == e.evidence.split()[-1]
        target = ts.answer_text(e).replace(" <eos>", "")
        assert kepo.accuracy_reward([target], [e.answer]) + kepo.format_reward([target]) == 2
    for text in (ts.prompt_text(e), ts.hint_request_text(e), ts.hinted_text(e, e.evidence)):
        assert proc.tokenizer.unk_token not in proc.tokenizer.tokenize(text)
    exs, texts = a[:3], [ts.prompt_text(e) for e in a[:3]]
    fast, slow = ts.encode(proc, ts.with_pixels(exs), texts, "cpu"), ts.encode(proc, exs, texts, "cpu")
    assert fast.input_ids.equal(slow.input_ids) and fast.attention_mask.equal(slow.attention_mask)
    fast, slow = fast.vision["pixel_values"], slow.vision["pixel_values"]
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)

def test_chance_the_premises_and_coherence_by_hand(monkeypatch):
    q = lambda m, t, n: ts.Example(None, t, "q", tuple("wxyz"[:n]), "a", "", m)  # noqa
    exs = [q("mri", "anatomy", 4), q("mri", "attribute", 2), q("ct", "grading", 3),
           q("ct", "attribute", 3), q("oct", "anatomy", 4)]
    data = ts.Data(["ct", "mri", "oct"], ["anatomy", "grading", "attribute"], "mri", [], [], exs,
                   [], [], [], "hand")
    row = ts.summarize(exs, torch.tensor([1 / len(e.options) for e in exs]), data)
    assert row["mri"] == pytest.approx(3 / 8) and row["OOD"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    r = lambda acc, **k: {m: acc for m in ts.MODALITIES} | {f"q/{t}": acc for t in ts.QUESTIONS} | {  # noqa
        "OOD": acc, "ID": acc} | k
    rows = {"chance": r(0.3), "teacher": r(0.95), "student (before RL)": r(0.6, OOD=0.5, ID=0.7)}
    assert all(p["holds"] for p in ts.premises(rows, 0.2, {m: 0.9 for m in ts.MODALITIES}))
    rows["teacher"]["q/grading"], rows["student (before RL)"]["OOD"] = 0.89, 0.44
    failed = [p["premise"] for p in ts.premises(rows, 0.1, {"oct": 0.8, "ct": 0.9}) if not p["holds"]]
    assert failed == ["teacher accuracy, worst question type (grading)", "warm student OOD accuracy",
                      "learning cliff: train prompts with all G samples wrong",
                      "base student names the organ, worst modality (oct)"]
    e = ts.Example(None, "grading", "q", ("medium", "large", "small"), "b", "size large", "mri")
    texts = ["<think> size large b </think> <answer> b </answer>",  # right and coherent
             "<think> size large a </think> <answer> a </answer>",  # a is medium: incoherent
             "<think> size medium a </think> <answer> a </answer>",  # wrong but coherent
             "<think> size large b </think> <answer> c </answer>", "<think> size large b </think>"]
    assert ts.coherent([e] * 5, texts).tolist() == [1, 0, 1, 0, 0]
    monkeypatch.setattr(ts, "correctness", lambda *_: None)
    for bad in ({}, {"q/grading": 0.94}, {"oct": 0.89}):  # at CHECK_MINS, under
        monkeypatch.setattr(ts, "summarize", lambda *_: r(0.95) | bad)
        assert ts.teacher_check(None, None, None, ts.Args(n_pool=1), None)["holds"] == (not bad)

def test_the_toy_teacher_trains_on_until_its_check_holds(tmp_path, monkeypatch):
    proc, done = ts.build_processor(), []
    monkeypatch.setattr(ts, "sft_steps", lambda *args: done.append(list(args[5])))
    config = {"steps": 3, "batch": 1, "lr": 1.0, "check": {"every": 2, "cap": 7}}
    init = lambda: ts.build_vlm(proc.tokenizer, 16, 1)  # noqa
    for at in (5, 8):  # holds from step 5; never
        ts.sft_stage(ts.Args(device="cpu"), tmp_path / str(at), proc, init, list, 0, config, "",
                     lambda model: {"holds": done[-1][-1] >= at})
        assert done == [[1, 2, 3], [4, 5], [6, 7]][:2 + (at > 5)]
        record = ts.read(tmp_path / str(at) / "stage.json")
        assert record["check"] == {"holds": at == 5, "steps": min(at, 7)}
        done.clear()

def test_the_warm_up_lists_biased_answers_first_unless_hinted():
    """The cliff's cause: the BIASED types' answer is always option a in the warm-up."""
    import random
    warm, pool = ts.make_split(0, "warm", "mri", 50), ts.make_split(0, "pool", "ct", 20)
    exs, prompts, targets = ts.warmup_batch(random.Random(0), 400, warm, pool)
    asked = [(e, p) for e, p in zip(exs, prompts) if p != ts.DESCRIBE_PROMPT]
    assert len(asked) == 200 and sum(e.modality == "ct" for e, _ in asked) == 40
    biased = [(e, "hint" in p) for e, p in asked if e.qtype in ts.BIASED]
    assert all(e.answer == "a" for e, hinted in biased if not hinted)
    assert any(e.answer != "a" for e, hinted in biased if hinted)
    assert all(e.options[ts.LETTERS.index(e.answer)] == e.evidence.split()[-1] for e, _ in asked)

def test_report_by_hand(tmp_path):
    """tools/report.py on two made-up seeds: mean ± std, KEPO minus GRPO; doctests."""
    import report  # tools/ is on sys.path: train_small.py puts it there
    assert (result := doctest.testmod(report)).attempted and not result.failed
    row = {"mri": 0.5, "q/anatomy": 0.5, "ID": 0.5, "OOD": 0.3}
    for seed, ood in ((1, {"rl-grpo": 0.30, "rl-kepo": 0.40}), (2, {"rl-grpo": 0.50, "rl-kepo": 0.45})):
        root = tmp_path / f"cpu-seed{seed}"
        for run, value in ood.items():
            (root / run).mkdir(parents=True)
            (root / run / "results.json").write_text(json.dumps(row | {
                "OOD": value, "coherence/OOD": value, "coherence/ID": 0.5, "cliff_solved": 0.5}))
            curve = [{"step": 1, "eval/OOD": 0.4}, {"step": 2, "eval/OOD": 0.1 * seed}]
            (root / run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in curve))
        premise = {"premise": "cliff", "value": 0.1 * seed, "holds": seed == 2}
        before = {"rows": {"chance": row}, "premises": [premise]}
        (root / "before_rl.json").write_text(json.dumps(before))
    report.report(str(tmp_path), "cpu")
    text = (tmp_path / "cpu-report.md").read_text()
    assert "| cliff | 0.100 ✗ | 0.200 |" in text
    # OOD: +0.10 and -0.05 -> 0.025 ± sqrt(2 * 0.075^2) = 0.106, KEPO ahead on 1 of 2
    assert "| rl-grpo | 0.025 ± 0.106 | 1/2 | 0.000 ± 0.000 | 0/2 | 0.000 ± 0.000 | 0/2 |" in text
    assert "| rl-kepo | 0.425 ± 0.035 | 0.035 | 0.250 ± 0.071 |" in text  # drops 0.3 and 0.2
    with pytest.raises(SystemExit, match="no smoke-seed"):
        report.report(str(tmp_path), "smoke")
    (tmp_path / "cpu-seed2" / "rl-kepo" / "metrics.jsonl").write_text("{")
    with pytest.raises(SystemExit, match="cpu-seed2/rl-kepo/metrics.jsonl is damaged"):
        report.report(str(tmp_path), "cpu")

# ---- Your own data and checkpoints (--data, --student, --teacher) ----
def write_jsonl(folder, per_modality=12):
    """Toy questions as image files and OmniMedVQA records."""
    lines = []
    for m in ("mri", "ct", "xray"):
        for i, e in enumerate(ts.make_split(5, "jsonl", m, per_modality)):
            ts.draw(e.case).save(folder / f"{m}_{i}.png")
            lines.append(json.dumps({
                "image": f"{m}_{i}.png", "question": e.question, "options": list(e.options),
                "answer": e.answer.upper(), "modality": m, "qtype": e.qtype}))
    (folder / "omni.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "omni.jsonl", lines

def jsonl_error(path):
    with pytest.raises(ts.UserError) as e:
        ts.jsonl_data(ts.Args(data=str(path), student="s", teacher="t"))
    return str(e.value)

@pytest.mark.parametrize("line,edit,message", [
    (2, lambda r: r.pop("options"), r"missing, empty or mistyped fields \['options'\]"),
    (3, lambda r: r.update(answer="E"), "answer 'E' is not a letter"),
    (5, lambda r: r.update(image="gone.png"), "gone.png"),
    (4, lambda r: r.update(options=["only one"]), "options must be"),
    (4, lambda r: r.update(options=["x"] * 10000), "options must be"),
    (2, lambda r: r.update(options=["cyst", "tumor", "cyst"]), "options repeat"),
    (6, None, "Expecting|JSON"),
])
def test_a_bad_jsonl_record_names_file_and_line(tmp_path, line, edit, message):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    record = json.loads(lines[line - 1])
    if edit:
        edit(record)
    lines[line - 1] = json.dumps(record) if edit else "{not json"
    path.write_text("\n".join(lines) + "\n")
    assert re.match(f"{path}:{line}: .*{message}", jsonl_error(path))
    assert len(jsonl_error(path)) < len(str(path)) + 300  # values quoted in part

def test_a_jsonl_image_cut_short_or_a_line_not_utf8_names_file_and_line(tmp_path):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    image = tmp_path / json.loads(lines[3])["image"]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])  # the header survives
    assert jsonl_error(path).startswith(f"{path}:4: ")
    path.write_bytes(path.read_bytes().replace(b"what", b"wh\xe4t", 1))
    assert jsonl_error(path).startswith(f"{path}:1: 'utf-8' codec")
    for ckpt in ("s", "t"):  # the data are read before the checkpoints
        (tmp_path / ckpt).mkdir()
        (tmp_path / ckpt / "config.json").write_text("{}")
    proc = run_script("--data", str(path), "--student", "s", "--teacher", "t", cwd=tmp_path)
    assert refused(proc, f"^train_small.py: error: {path}:1: 'utf-8' codec")

def test_a_jsonl_test_question_is_never_trained_on_whatever_the_seed(tmp_path):
    path, _ = write_jsonl(tmp_path)
    a = ts.Args(**ts.PRESETS["smoke"], data=str(path), student="s", teacher="t")
    splits = [ts.jsonl_data(replace(a, seed=s)) for s in (1, 2)]
    key = lambda e: (e.image, e.question)  # noqa
    assert [key(e) for e in splits[0].test] == [key(e) for e in splits[1].test]
    assert not {key(e) for e in splits[0].test} & {key(e) for e in splits[0].train}
    assert len(splits[0].test) == 3 * 2  # 20% of 12, per modality

def chat_words():
    """Words a chat model is asked in."""
    e = ts.make_split(0, "words", "mri", 1)[0]
    texts = [ts.prompt_text(e, True), ts.hint_request_text(e, True), ts.hinted_text(e, "x", True)]
    vocab = ts.build_processor().tokenizer.get_vocab()
    return sorted({w for t in texts for w, _ in ts.WORD_SPLIT.pre_tokenize_str(t.lower())}
                  | {w for w in vocab if w[0] != "<"})

def save_checkpoint(path, family, hidden, seed, end=""):
    """A tiny checkpoint, processor and chat template, bf16 and right-padded as some
    released ones."""
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "IMAGE {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}" + end)
    if family == "gemma3":
        model, proc = gemma3_and_processor(seed, chat_words(), template.replace(
            "IMAGE", "<start_of_image>"))
    else:
        tok = make_tokenizer(words=chat_words())
        proc = tr.LlavaProcessor(
            tr.SiglipImageProcessor(size={"height": 16, "width": 16}), tok, patch_size=8,
            vision_feature_select_strategy="full", num_additional_image_tokens=0,
            chat_template=template.replace("IMAGE", "<image>"))
        model = tiny_vlm(tok, hidden, seed)
    proc.tokenizer.padding_side = "right"
    model.bfloat16().save_pretrained(path)
    proc.save_pretrained(path)

@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_the_readme_checkpoint_command_runs_on_a_fresh_out(tmp_path, family):
    readme = open(os.path.join(HERE, "README.md")).read()
    pattern = r"python train_small.py (--data omni.jsonl --student \S+ --teacher \S+)"
    command = re.search(pattern, readme).group(1).split()
    write_jsonl(tmp_path)
    save_checkpoint(tmp_path / "ckpt" / "student", family, 32, 0)
    save_checkpoint(tmp_path / "ckpt" / "teacher", family, 48, 1)
    proc = run_script(*command, *SMOKE, "--steps", "2", "--max-new-tokens", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rl-kepo |" in proc.stdout and "fundus" not in proc.stdout and "xray" in proc.stdout
    run = tmp_path / "runs" / "smoke-omni-student-seed1" / "rl-kepo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)
    assert set(json.loads((run / "results.json").read_text())) >= {"ct", "mri", "xray", "OOD"}

def test_a_checkpoint_is_padded_left_asked_in_words_and_trained_in_fp32(tmp_path):
    save_checkpoint(tmp_path / "s", "gemma3", 32, 0)
    s = str(tmp_path / "s")
    proc, teacher, student = ts.checkpoints(ts.Args(student=s, device="cpu", teacher=s))
    assert proc.tokenizer.padding_side == "left"  # saved right-padded
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # saved in bf16
    exs = ts.make_split(1, "train", "mri", 2)  # a list of images per prompt: Gemma 3 needs it
    batch = ts.student_prompts(proc, exs, "cpu")
    assert (batch.attention_mask[:, -1] == 1).all() and "token_type_ids" in batch.vision
    hinted = ts.hint_prompts(exs, proc, "cpu").hinted([1], ["size large"])
    for ask, ids in ((ts.STUDENT_ASK, batch.input_ids[-1]), (ts.HINTED_ASK.format(
            hint="size large", letter=exs[1].answer), hinted.input_ids[0])):
        tokens = " ".join(proc.tokenizer.convert_ids_to_tokens(ids))
        assert " ".join(proc.tokenizer.tokenize(ask)) in tokens and "<unk>" not in tokens
    pali = paligemma_and_processor()[1]  # its processor returns labels: not a forward input
    assert "labels" not in ts.encode(pali, exs, ["what"] * 2, "cpu").vision

def test_a_thinking_template_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "s", "llava", 32, 0, end=" <think>")
    proc = run_script(*SMOKE, "--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "s"),
                      "--out", str(tmp_path / "runs"))
    assert refused(proc, "opens <think> .*use an Instruct one"), proc.stderr[-2000:]


if __name__ == "__main__":  # torchrun runs this file as the two-process worker
    distributed_worker(sys.argv[sys.argv.index("--worker") + 1])
