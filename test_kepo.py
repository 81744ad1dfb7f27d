"""Tests. kepo.py's come first, in its order, and import nothing from train_small.py
(they travel with kepo.py): math against independent computations, the step's
gradient against eq. 7 written by hand, KEPO's rules on a scripted policy, two
processes (DDP, FSDP2) against one. Then train_small.py: the toy, its stages and
its command line, and checkpoints of other VLM families."""
import datetime
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
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as tr
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch.nn.utils.rnn import pad_sequence

import kepo

# ---- Factories: a tokenizer, tiny VLMs, prompts, rollouts, a scripted policy, a step ----
WORDS = "what finding is shown options a b c d look at lesion large small round answer hint".split()
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<hint>", "</hint>"]
N_IMG = 4  # image tokens per prompt: a 16x16 image in 8x8 patches
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))]
ATOL = {"cpu": 1e-5, "cuda": 1e-4}  # cuDNN may pick TF32 for the patch embedding

def make_tokenizer(specials=None, words=WORDS, padding_side="left"):
    """A word-level tokenizer; specials: {name: token}, e.g. image_token."""
    specials = specials or {"image_token": "<image>"}
    vocab = dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", *specials.values(), *words])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tok = tr.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side=padding_side, extra_special_tokens=specials)
    tok.add_tokens(TAGS)  # whole, and decoded
    return tok

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()

def tiny_vlm(tok, hidden=32, seed=0, vocab=None):
    torch.manual_seed(seed)
    vision = tr.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=16, patch_size=8)
    text = tr.Qwen2Config(vocab_size=vocab or len(tok), hidden_size=hidden, num_hidden_layers=1,
                          intermediate_size=2 * hidden, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return tr.LlavaForConditionalGeneration(tr.LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=N_IMG,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full"))

def prompt_batch(tok, texts, seed=0, device="cpu"):
    enc = tok(["<image> " * N_IMG + t for t in texts], return_tensors="pt", padding=True)
    pixels = torch.randn(len(texts), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return on(kepo.PromptBatch(enc.input_ids, enc.attention_mask, {"pixel_values": pixels}), device)

def on(batch, device):
    vision = {k: v.to(device) for k, v in batch.vision.items()}
    return kepo.PromptBatch(batch.input_ids.to(device), batch.attention_mask.to(device), vision)

def rollouts_of(tok, n=8, length=5, seed=0, device="cpu"):
    """n rollouts of random allowed ids, lengths 1..length, prompts cycling over two."""
    prompts = prompt_batch(tok, ["what finding is shown options a b", "what is shown"], device=device)
    gen = torch.Generator().manual_seed(seed)
    words = torch.tensor(tok.convert_tokens_to_ids(WORDS))
    ids = words[torch.randint(len(WORDS), (n, length), generator=gen)]
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=gen)).int()
    return kepo.Rollouts(prompts.select([i % 2 for i in range(n)]), ids.to(device),
                         mask.to(device), [""] * n)

def answer(letter):
    return f"<think> look </think> <answer> {letter} </answer>"

class ScriptedVLM(torch.nn.Module):
    """A tiny LLaVA for forwards whose `generate` writes rule(row, prompt ids) instead of
    sampling; it records each call's batch size, so tests count the work done."""

    def __init__(self, tok, rule, hidden=32, seed=0, logit_offset=0.0):
        super().__init__()
        self.model, self.tok, self.rule, self.calls = tiny_vlm(tok, hidden, seed), tok, rule, []
        self.config, self.logit_offset = self.model.config, logit_offset
        self.generation_config = self.model.generation_config

    def forward(self, **kwargs):
        self.calls.append(("forward", len(kwargs["input_ids"])))
        out = self.model(**kwargs)
        out.logits = out.logits + self.logit_offset  # the same policy: softmax ignores it
        return out

    def generate(self, input_ids, **kwargs):
        self.calls.append(("generate", len(input_ids)))
        texts = [self.rule(i, row) for i, row in enumerate(input_ids.tolist())]
        seqs = [torch.tensor(self.tok(t).input_ids + [self.tok.eos_token_id]) for t in texts]
        return torch.cat([input_ids, pad_sequence(seqs, True, self.tok.pad_token_id)], 1)

def hinted_student(tok, wrong="c"):
    """Answers right (the letter after "answer" in the hinted prompt) with a hint, else `wrong`."""
    hint, word = tok.convert_tokens_to_ids("hint"), tok.convert_tokens_to_ids("answer")
    return lambda i, row: answer(tok.decode(row[row.index(word) + 1])) if hint in row \
        else answer(wrong)

def scripted_step(tok, answers=("b", "a"), teacher_rule=lambda i, row: "<hint> look </hint>",
                  **cfg):
    """A KEPO step's pieces: scripted student and teacher, prompts, hint prompts, config."""
    student, teacher = ScriptedVLM(tok, hinted_student(tok)), ScriptedVLM(tok, teacher_rule, 48, 1)
    prompts = prompt_batch(tok, ["what is shown"] * len(answers))
    hints = kepo.HintPrompts(request=prompts.select, hinted=lambda idx, h: prompt_batch(
        tok, [f"hint {x} answer {answers[i]}" for i, x in zip(idx, h)]))
    config = kepo.KEPOConfig(**{"group_size": 4, "max_new_tokens": 8, "max_attempts": 1, **cfg})
    return student, teacher, prompts, hints, config

def hand_jsd(s_logits, t_logits, beta, temperature):
    """Per-token generalized JSD from probabilities, written independently of kepo.py."""
    p_s = torch.softmax(s_logits.double() / temperature, -1)
    p_t = torch.softmax(t_logits.double() / temperature, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    if beta in (0, 1):
        return kl(p_t, p_s) if beta == 0 else kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)

def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ---- 1. Generation ----
def test_completion_mask_stops_at_the_first_stop_id():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [9, 7, 6, 2, 2]])
    assert kepo.completion_mask(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                                       [1] * 5, [1] * 4 + [0]]
    assert kepo.completion_mask(ids, [2, 7]).tolist()[2:] == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]

def test_a_turn_ends_at_the_generation_config_end_ids():
    """A chat model's turn ends at its generation_config ids (Gemma's <end_of_turn>), not only EOS."""
    tok = make_tokenizer({"image_token": "<image>", "eot_token": "<end_of_turn>"})
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    model = ScriptedVLM(tok, lambda i, row: answer("b") + " <end_of_turn> look look")
    model.generation_config.eos_token_id = [tok.eos_token_id, eot]
    assert kepo.stop_ids(tok, model) == sorted({tok.eos_token_id, eot})
    assert eot not in kepo.suppressed_ids(tok, model)
    cfg = kepo.KEPOConfig(max_new_tokens=8)
    out = kepo.generate_rollouts(model, tok, prompt_batch(tok, ["what"]), 2, cfg, [])
    assert out.completion_ids[0][out.completion_mask[0].bool()][-1] == eot
    assert out.texts == [answer("b")] * 2 and kepo.format_reward(out.texts).tolist() == [1, 1]

def test_index_vision_batch_first_and_grid():
    pv = torch.arange(3)[:, None, None, None].expand(3, 3, 2, 2).float()
    assert kepo.index_vision({"pixel_values": pv}, torch.tensor([2, 2, 0]))[
        "pixel_values"][:, 0, 0, 0].tolist() == [2, 2, 0]
    grid = torch.tensor([[1, 2, 2], [1, 1, 2], [1, 2, 1]])  # 4, 2 and 2 patches
    patches = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]).float()[:, None]
    out = kepo.index_vision({"pixel_values": patches, "image_grid_thw": grid}, torch.tensor([1, 1, 0]))
    assert out["pixel_values"].squeeze(1).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out["image_grid_thw"].tolist() == [[1, 1, 2], [1, 1, 2], [1, 2, 2]]

def test_generation_shapes_masks_and_logps(tokenizer):
    model, suppress = tiny_vlm(tokenizer), kepo.suppressed_ids(tokenizer, tiny_vlm(tokenizer))
    prompts = prompt_batch(tokenizer, ["what finding is shown", "what is shown options a b"])
    torch.manual_seed(1)
    r = kepo.generate_rollouts(model, tokenizer, prompts, 3, kepo.KEPOConfig(max_new_tokens=6),
                               suppress)
    assert r.completion_ids.shape[0] == 6 and r.completion_ids.shape[1] <= 6 and len(r.texts) == 6
    assert torch.equal(r.prompts.input_ids[0], r.prompts.input_ids[2])  # repeated in place
    assert torch.equal(r.prompts.vision["pixel_values"][3], prompts.vision["pixel_values"][1])
    assert tokenizer.convert_tokens_to_ids("<image>") in suppress
    assert tokenizer.eos_token_id not in suppress
    assert not torch.isin(r.completion_ids[r.completion_mask.bool()], torch.tensor(suppress)).any()
    logps = kepo.selective_logps(kepo.completion_logits(model, r, []), r.completion_ids, 1.0)
    full = torch.cat([r.prompts.input_ids, r.completion_ids], 1)
    att = torch.cat([r.prompts.attention_mask, r.completion_mask], 1)
    logits = model(input_ids=full, attention_mask=att, **r.prompts.vision).logits
    p = r.prompts.input_ids.shape[1]
    expected = logits[:, p - 1:-1].log_softmax(-1).gather(-1, r.completion_ids[..., None])
    assert torch.allclose(logps, expected.squeeze(-1), atol=1e-5)

def scoring_matches_generate(model, tok, rows, device="cpu"):
    """Does one scoring forward reproduce `generate`'s own logits (with left padding)?"""
    suppress = kepo.suppressed_ids(tok, model)
    torch.manual_seed(0)
    out = model.generate(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                         **rows.vision, do_sample=True, top_k=0, max_new_tokens=5, min_new_tokens=5,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         suppress_tokens=suppress, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[:, rows.input_ids.shape[1]:]
    r = kepo.Rollouts(rows, ids, torch.ones_like(ids, dtype=torch.int), [""] * len(ids))
    expected = torch.stack(out.logits, 1).index_fill(-1, torch.tensor(suppress, device=device), -1e9)
    return torch.allclose(kepo.completion_logits(model, r, suppress), expected, atol=ATOL[device])

@pytest.mark.parametrize("device", DEVICES)
def test_scoring_reproduces_generate_logits(tokenizer, device):
    model = tiny_vlm(tokenizer).to(device)
    prompts = prompt_batch(tokenizer, ["what finding is shown options a b c d look", "what"],
                           device=device)
    assert (prompts.attention_mask == 0).any()  # one prompt is left-padded
    assert scoring_matches_generate(model, tokenizer, prompts.select([0, 0, 1, 1]), device)

def tiny_qwen2_vl(seed=0, device="cpu"):
    """A Qwen2-VL (flattened patches + image_grid_thw + mm_token_type_ids), inputs by hand."""
    processor = getattr(tr, "Qwen2VLImageProcessorPil", None) or tr.Qwen2VLImageProcessor
    tok = make_tokenizer({"image_token": "<|image_pad|>", "vision_start": "<|vision_start|>",
                          "vision_end": "<|vision_end|>"})
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    model = tr.Qwen2VLForConditionalGeneration(tr.Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=3,
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"]))
    try:
        images = processor(min_pixels=56 * 56, max_pixels=56 * 56)(
            [Image.new("RGB", (56, 56), (i * 90, 30, 30)) for i in range(2)],
            return_tensors="pt")
    except ImportError as e:  # transformers 5.4 asks for torchvision even here
        pytest.skip(f"no Qwen2-VL image processor without torchvision: {str(e)[:60]}")
    n_image = (images["image_grid_thw"].prod(-1) // 4).tolist()  # 2x2 patches merge
    enc = tok([f"<|vision_start|> {'<|image_pad|> ' * n}<|vision_end|> {q}"
               for n, q in zip(n_image, ["what finding is shown options a b", "what"])],
              return_tensors="pt", padding=True)
    vision = {"pixel_values": images["pixel_values"], "image_grid_thw": images["image_grid_thw"],
              "mm_token_type_ids": (enc.input_ids == vocab["<|image_pad|>"]).long()}
    return model.to(device), tok, on(kepo.PromptBatch(enc.input_ids, enc.attention_mask, vision),
                                     device)

@pytest.mark.parametrize("device", DEVICES)
def test_qwen2_vl_flattened_patches_score_and_train(device):
    model, tok, prompts = tiny_qwen2_vl(device=device)
    assert prompts.vision["pixel_values"].shape[0] != len(prompts.input_ids)  # not batch-first
    assert scoring_matches_generate(model, tok, prompts.select([0, 0, 1, 1]), device)
    teacher, before = tiny_qwen2_vl(1, device)[0], [p.detach().clone() for p in model.parameters()]
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_attempts=1, tau=0.0, hint_mode="always")
    hints = kepo.HintPrompts(request=prompts.select, hinted=lambda idx, h: prompts.select(idx))
    m = kepo.kepo_step(model, torch.optim.SGD(model.parameters(), lr=0.5), tok, prompts, ["A", "B"],
                       cfg, "kepo", teacher, hint_prompts=hints)
    assert math.isfinite(m["loss"]) and m["gate_frac"] == 1.0 and m["hint_groups"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

def gemma3_and_processor(seed=0, words=WORDS, template=None):
    """A tiny Gemma 3 (token_type_ids marks image tokens; a turn ends at <end_of_turn>)."""
    specials = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>", "eot_token": "<end_of_turn>"}
    tok = make_tokenizer(specials, words)
    images = getattr(tr, "Gemma3ImageProcessorPil", None) or tr.Gemma3ImageProcessor
    proc = tr.Gemma3Processor(image_processor=images(
        size={"height": 56, "width": 56}), tokenizer=tok, image_seq_length=4, chat_template=template)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in specials.items()}
    torch.manual_seed(seed)
    model = tr.Gemma3ForConditionalGeneration(tr.Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, sliding_window=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=56, patch_size=14),
        mm_tokens_per_image=4, image_token_index=ids["image_token"],
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"]))
    model.generation_config.eos_token_id = [tok.eos_token_id, ids["eot_token"]]
    return model, proc

def paligemma_and_processor(seed=0):
    """A tiny PaliGemma (token_type_ids: 0 prefix, 1 suffix; its processor returns labels)."""
    tok = make_tokenizer()
    images = tr.SiglipImageProcessor(size={"height": 56, "width": 56})
    images.image_seq_length = 16
    torch.manual_seed(seed)
    model = tr.PaliGemmaForConditionalGeneration(tr.PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=32, head_dim=16,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32))
    return model, tr.PaliGemmaProcessor(image_processor=images, tokenizer=tok)

@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_token_type_ids_are_extended_as_generate_extends_them(family):
    """Scoring extends token-aligned inputs over the completion as generate does: 0 for Gemma 3's
    text, 1 for PaliGemma's causal suffix (0 would let a completion token see its future)."""
    model, proc = {"gemma3": gemma3_and_processor, "paligemma": paligemma_and_processor}[family]()
    if family == "paligemma" and "_update_model_kwargs_for_generation" not in vars(type(model)):
        pytest.skip("this transformers' PaliGemma generates its suffix as prefix tokens")
    image = "<start_of_image>" if family == "gemma3" else "<image>"
    images = [[Image.new("RGB", (56, 56), (i * 90, 20, 20))] for i in range(2)]
    enc = proc(text=[f"{image} what is shown", f"{image} what finding is shown options a b"],
               images=images, return_tensors="pt", padding=True)
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "labels")}
    rows = kepo.PromptBatch(enc["input_ids"], enc["attention_mask"], vision).select([0, 0, 1, 1])
    assert "token_type_ids" in vision and scoring_matches_generate(model, proc.tokenizer, rows)

def test_generation_refuses_right_padded_prompts(tokenizer):
    prompts = prompt_batch(make_tokenizer(padding_side="right"), ["what", "what finding is shown"])
    with pytest.raises(ValueError, match="left-padded"):
        kepo.generate_rollouts(tiny_vlm(tokenizer), tokenizer, prompts, 2, kepo.KEPOConfig(), [])


# ---- 2. Reward r = accuracy + format; advantages ----
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

def test_group_advantages_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    g = r[:4].tolist()
    expected = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for x in g] + [0.0] * 4
    assert torch.allclose(kepo.group_advantages(r, 4), torch.tensor(expected), atol=1e-6)
    for bad in (1, 3):
        with pytest.raises(ValueError, match="group_size"):
            kepo.group_advantages(r, bad)
    with pytest.raises(ValueError, match="one answer"):
        kepo.accuracy_reward(["a", "b"], ["A"])

def test_policy_loss_clipping_and_k3():
    logps = torch.full((2, 2), 0.5, requires_grad=True)  # ratio e^0.5 > 1 + eps
    loss = kepo.policy_loss(logps, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2),
                            0.2, None, 0.0)
    loss.backward()
    assert math.isclose(loss.item(), (-1.2 + math.exp(0.5)) / 2, rel_tol=1e-6)  # A>0 clipped
    assert torch.equal(logps.grad[0], torch.zeros(2))
    assert torch.allclose(logps.grad[1], torch.full((2,), math.exp(0.5) / 4))
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert (kepo.k3_kl(a, b) >= 0).all() and kepo.k3_kl(b, b).abs().max() == 0


# ---- 3. Quality gate, 4. teacher divergence ----
def test_quality_gate_edges():
    r = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert kepo.quality_gate(r, 0.0).tolist() == [True] * 4
    assert kepo.quality_gate(r, 1.0).tolist() == [False, True, True, True]
    assert kepo.quality_gate(r, 2.0).tolist() == [False, False, True, False]

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_hand_computation(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = (hand_jsd(s, t, beta, temperature) * mask).sum() / mask.sum()
    assert torch.allclose(kepo.generalized_jsd(s, t, mask, beta, temperature).double(), expected,
                          atol=1e-5)

def test_generalized_jsd_in_token_chunks_equals_one_pass(monkeypatch):
    t, mask = torch.randn(3, 5, 11), (torch.rand(3, 5) < 0.7).float()
    results = []
    for chunk in (1000, 2):
        monkeypatch.setattr(kepo, "JSD_CHUNK_TOKENS", chunk)
        s = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2), requires_grad=True)
        loss = kepo.generalized_jsd(s, t, mask, 0.3, 0.7)
        loss.backward()
        results.append((loss.item(), s.grad))
    assert results[0][0] == pytest.approx(hand_jsd(s.detach(), t, 0.3, 0.7)[mask.bool()].mean().item(),
                                          abs=1e-6)
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-7, rtol=0)

def test_generalized_jsd_endpoints_bounds_and_edge_cases():
    s, t, ones = torch.randn(2, 4, 7), torch.randn(2, 4, 7), torch.ones(2, 4)
    forward = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="sum", log_target=True) / 8
    assert torch.allclose(kepo.generalized_jsd(s, t, ones, 0.0, 1.0), forward, atol=1e-6)
    assert kepo.generalized_jsd(s, s.clone(), ones, 0.5, 1.0).abs() < 1e-6
    assert kepo.generalized_jsd(s, t * 50, ones, 0.5, 1.0) <= math.log(2) + 1e-6
    s = s.requires_grad_(True)
    empty = kepo.generalized_jsd(s, t, torch.zeros(2, 4), 0.5, 1.0)
    empty.backward()
    assert empty.item() == 0.0 and (s.grad == 0).all()
    s2, t2 = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    s2[..., 0] = t2[..., 0] = -1e9  # a suppressed id, masked as completion_logits masks it
    assert torch.isfinite(kepo.generalized_jsd(s2, t2, torch.ones(1, 2), 0.5, 1.0))


# ---- 5, 6. Hints and rejection sampling ----
def test_extract_hint():
    assert kepo.extract_hint("blah <hint> look at the size </hint> rest") == "look at the size"
    assert [kepo.extract_hint(t) for t in ("<hint>   </hint>", "none", "<hint>cut")] == [None] * 3

def test_cliff_triggers():
    acc, fmt = torch.tensor([0.0, 0, 1, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert kepo.cliff_groups(acc, acc + fmt, 2, "accuracy") == [0, 2]
    assert kepo.cliff_groups(acc, acc + fmt, 2, "reward") == [2]


# ---- 7. Loss and step: eq. 7 against a hand computation ----
def hand_loss(student, teacher, ref, r, rewards, method, cfg, suppress):
    """Eq. 7 (negated) written out: a plain forward, suppressed ids dropped from the
    vocabulary (they have probability 0), the sums over rows and tokens by hand."""
    vocab = student.config.text_config.vocab_size
    allowed = torch.tensor([i for i in range(vocab) if i not in suppress])
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
    rows, total, jsd_sum, gated_tokens = len(rewards), 0.0, 0.0, 0
    for i in range(rows):
        n = int(r.completion_mask[i].sum())
        a = 0.0 if method == "opd" else adv[i]
        d = ref_logp[i, :n, 0] - logp[i, :n]
        k3 = torch.exp(d) - d - 1
        total = total + (-a * torch.exp(logp[i, :n] - logp[i, :n].detach()) + cfg.beta_rl * k3
                         ).sum() / n / rows
        if method == "opd" or method != "grpo" and rewards[i] >= cfg.tau:
            jsd_sum = jsd_sum + hand_jsd(s[i, :n], t[i, :n], cfg.beta_jsd, cfg.jsd_temperature).sum()
            gated_tokens += n
    return total + cfg.distill_coef * jsd_sum / max(gated_tokens, 1)

@pytest.mark.parametrize("method", kepo.METHODS)
def test_the_step_loss_and_gradient_equal_eq7_by_hand(tokenizer, method):
    """kepo_backward at non-default settings (temperature, beta_jsd, jsd_temperature,
    distill_coef, beta_rl, micro-batches of 3) equals eq. 7 written by hand, for every
    method, on completions of different lengths with non-zero advantages."""
    r = rollouts_of(tokenizer, n=8, length=5, seed=3)
    rewards = torch.tensor([2.0, 0, 1, 0, 2, 2, 0, 1])  # tau 1: rows 0, 2, 4, 5, 7
    cfg = kepo.KEPOConfig(group_size=4, temperature=0.7, beta_jsd=0.3, jsd_temperature=1.5,
                          distill_coef=0.5, beta_rl=0.1, micro_batch_size=3)
    teacher, ref = tiny_vlm(tokenizer, 48, seed=1), tiny_vlm(tokenizer, 32, seed=2)
    suppress = kepo.suppressed_ids(tokenizer, teacher)
    student, twin = tiny_vlm(tokenizer, 32, seed=0), tiny_vlm(tokenizer, 32, seed=0)
    parts = kepo.kepo_backward(student, teacher, r, rewards, method, cfg, ref, suppress)
    expected = hand_loss(twin, teacher, ref, r, rewards, method, cfg, suppress)
    expected.backward()
    assert parts["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(grads(student), grads(twin), atol=2e-6)
    assert grads(student).abs().max() > 1e-3  # a gradient to compare

def test_micro_batches_give_the_full_batch_gradient_and_bf16_keeps_fp32_maths(tokenizer):
    """Chunks of 1, 3 and N rows (one gating nothing) give one pass's loss and gradient;
    bf16 models give a finite loss within 1% of fp32 (the maths is fp32)."""
    r, rewards = rollouts_of(tokenizer), torch.tensor([2.0, 0, 1, 0, 0, 0, 2, 1])
    teacher = tiny_vlm(tokenizer, 48, seed=1)
    results = []
    for size in (None, 1, 3, 8):
        student = tiny_vlm(tokenizer, 32, seed=0)
        cfg = kepo.KEPOConfig(group_size=2, micro_batch_size=size)
        results.append((kepo.kepo_backward(student, teacher, r, rewards, "kdpo", cfg, None, []),
                        grads(student)))
    for parts, grad in results[1:]:
        assert parts["loss"] == pytest.approx(results[0][0]["loss"], abs=1e-6)
        assert (grad - results[0][1]).abs().max() < 1e-6
    cfg, half = kepo.KEPOConfig(group_size=2), torch.bfloat16
    vision = {"pixel_values": r.prompts.vision["pixel_values"].to(half)}
    r16 = replace(r, prompts=kepo.PromptBatch(r.prompts.input_ids, r.prompts.attention_mask, vision))
    bf16 = kepo.kepo_backward(tiny_vlm(tokenizer).to(half), teacher.to(half), r16, rewards, "kdpo",
                              cfg, None, [])
    assert bf16["distill_loss"] == pytest.approx(results[0][0]["distill_loss"], rel=0.01)

def test_config_refuses_values_that_would_mean_something_else():
    bad = [("group_size", 1), ("num_hinted", 9), ("beta_jsd", 1.5), ("tau", 3.0), ("tau", -1.0),
           ("tau", None), ("hint_mode", "adaptve"), ("cliff_trigger", "format"),
           ("temperature", float("nan")), ("jsd_temperature", 0.0), ("jsd_temperature", -1.0),
           ("distill_coef", -1.0), ("clip_eps", -0.2), ("max_grad_norm", 0.0),
           ("top_p", float("inf")), ("beta_rl", float("inf")), ("micro_batch_size", 0)]
    for name, value in bad:
        with pytest.raises((ValueError, TypeError), match=f"KEPOConfig.{name}=|not supported"):
            kepo.KEPOConfig(**{name: value})
    kepo.KEPOConfig(tau=0.0), kepo.KEPOConfig(tau=2.0), kepo.KEPOConfig(micro_batch_size=None)

def test_the_step_refuses_missing_inputs_before_sampling(tokenizer):
    student, teacher, prompts, hints, cfg = scripted_step(tokenizer)
    for kwargs, why in [(dict(method="ppo"), "method must"), (dict(), "needs a teacher"),
                        (dict(teacher=teacher), "needs hint_prompts"),
                        (dict(method="grpo", cfg=replace(cfg, beta_rl=0.1)), "ref_model")]:
        kwargs = {"method": "kepo", "cfg": cfg} | kwargs
        with pytest.raises(ValueError, match=why):
            kepo.kepo_step(student, None, tokenizer, prompts, ["B", "A"], **kwargs)
    assert student.calls == []

def test_the_kl_to_a_reference_is_finite_after_early_eos(tokenizer):
    """Pad positions hold suppressed ids near -1e9 (a float32 step is 128 there): unmasked,
    the same policy's KL would be NaN, not 0. For grpo and opd (which honours beta_rl)."""
    short_and_long = lambda i, row: answer("b") if i % 2 else answer("c") + " look at lesion"  # noqa
    student = ScriptedVLM(tokenizer, short_and_long, logit_offset=300.0)
    ref, teacher = ScriptedVLM(tokenizer, short_and_long), ScriptedVLM(tokenizer, short_and_long)
    prompts, cfg = prompt_batch(tokenizer, ["what is shown"] * 2), kepo.KEPOConfig(
        group_size=2, max_new_tokens=12, beta_rl=0.1)
    for method in ("grpo", "opd"):
        m = kepo.kepo_step(student, torch.optim.SGD(student.parameters(), lr=0.0), tokenizer, prompts,
                           ["B", "A"], cfg, method, teacher, ref)
        assert m["completions/mean_length"] < 12 and m["kl"] == pytest.approx(0, abs=1e-5)
        assert math.isfinite(m["loss"]) and all(torch.isfinite(p).all() for p in student.parameters())

@pytest.mark.parametrize("device", DEVICES)
def test_kepo_step_runs_and_changes_weights(tokenizer, device):
    student, teacher = tiny_vlm(tokenizer).to(device), tiny_vlm(tokenizer, 48, 1).to(device)
    prompts = prompt_batch(tokenizer, ["what finding is shown options a b", "what"], device=device)
    hints = kepo.HintPrompts(prompts.select, lambda idx, h: prompt_batch(
        tokenizer, [f"hint {x} what" for x in h], device=device))
    cfg = kepo.KEPOConfig(group_size=4, max_new_tokens=6, max_hint_tokens=6, max_attempts=2,
                          tau=0.0, hint_mode="always")
    before = [p.detach().clone() for p in student.parameters()]
    torch.manual_seed(0)
    m = kepo.kepo_step(student, torch.optim.AdamW(student.parameters(), lr=1e-2), tokenizer,
                       prompts, ["A", "B"], cfg, "kepo", teacher, tiny_vlm(tokenizer).to(device), hints)
    assert m["distill_loss"] > 0 and m["gate_frac"] == 1.0 and m["hint_groups"] == 2
    assert all(math.isfinite(v) for v in m.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


# ---- KEPO's rules, on a scripted policy (each rule broken in a copy fails its test) ----
def test_rule_injection_keeps_the_hint_free_prompt_and_rescores(tokenizer, monkeypatch):
    """Correct hinted samples replace rollouts under the original hint-free prompt, rescored
    (r = 2, positive advantage), and eq. 7 then distils exactly those rows at tau = 2."""
    student, teacher, prompts, hints, cfg = scripted_step(tokenizer, tau=2.0)
    seen = {}
    real = kepo.kepo_backward
    monkeypatch.setattr(kepo, "kepo_backward", lambda *a: seen.setdefault("a", a) and real(*a))
    m = kepo.kepo_step(student, torch.optim.SGD(student.parameters(), lr=0.0), tokenizer, prompts,
                       ["B", "A"], cfg, "kepo", teacher, hint_prompts=hints)
    rollouts, rewards = seen["a"][2], seen["a"][3]
    assert rollouts.texts == [answer("b")] * 2 + [answer("c")] * 2 + [answer("a")] * 2 + [answer("c")] * 2
    assert torch.equal(rollouts.prompts.input_ids, prompts.select([0] * 4 + [1] * 4).input_ids)
    assert rewards.tolist() == [2, 2, 1, 1, 2, 2, 1, 1] and m["hint_injected"] == 4
    assert (kepo.group_advantages(rewards, 4)[rewards == 2] > 0).all() and m["gate_frac"] == 0.5

def test_rule_each_correct_hinted_sample_is_accepted_on_its_own(tokenizer):
    """K = 2 and one correct sample in each try of two: each is kept (all-or-nothing keeps none)."""
    student = ScriptedVLM(tokenizer, lambda i, row: answer("b" if i % 2 == 0 else "c"))
    for attempts, kept in ((1, 1), (2, 2)):
        cfg = kepo.KEPOConfig(group_size=4, max_attempts=attempts, max_new_tokens=8)
        accepted = kepo.rejection_sample(student, tokenizer, prompt_batch(tokenizer, ["hint"]),
                                         ["B"], cfg, [])
        assert [text for _, text in accepted[0]] == [answer("b")] * kept

def test_rule_injection_replaces_distinct_failed_slots_first():
    """A group's K slots are distinct rows, lowest reward first; other rows are untouched."""
    tok = make_tokenizer()
    r = kepo.Rollouts(prompt_batch(tok, [f"p{i}" for i in range(12)]),
                      *[pad_sequence(x, True) for x in (
                          [torch.full((1 + i % 3,), i + 10) for i in range(12)],
                          [torch.ones(1 + i % 3, dtype=torch.int) for i in range(12)])],
                      [f"t{i}" for i in range(12)])
    new = [(torch.tensor([7] * 5), "h0"), (torch.tensor([8]), "h1")]
    rewards = torch.tensor([1.0, 0, 2, 0, 0, 0, 0, 0, 2, 1, 0, 1])
    out = kepo.inject(r, rewards, 4, {0: new, 2: new[:1]}, pad_id=0)
    assert out.texts == ["t0", "h0", "t2", "h1", *r.texts[4:8], "t8", "t9", "h0", "t11"]
    assert out.completion_ids[3].tolist() == [8, 0, 0, 0, 0] and out.completion_mask[1].sum() == 5
    assert out.completion_ids[9, :2].tolist() == r.completion_ids[9, :2].tolist()
    assert torch.equal(out.prompts.input_ids, r.prompts.input_ids)

@pytest.mark.parametrize("trigger,hinted", [("accuracy", True), ("reward", False)])
def test_rule_hints_trigger_per_group_on_the_cliff(tokenizer, trigger, hinted):
    """All rollouts well formatted but wrong (r = 1): a cliff for "accuracy", not for "reward"."""
    student, teacher, prompts, hints, cfg = scripted_step(tokenizer, cliff_trigger=trigger)
    m = kepo.kepo_step(student, torch.optim.SGD(student.parameters(), lr=0.0), tokenizer, prompts,
                       ["B", "A"], cfg, "kepo", teacher, hint_prompts=hints)
    assert m["sample_accuracy"] == 0 and m.get("hint_groups", 0) == 2 * hinted
    assert (("generate", 2) in teacher.calls) == hinted

def test_rule_the_gate_admits_r_at_least_tau_and_the_teacher_sees_only_those_rows(tokenizer):
    """The teacher's forward covers the gated rows only; an empty gate calls no teacher, gives 0."""
    r = rollouts_of(tokenizer)
    teacher = ScriptedVLM(tokenizer, None, 48, 1)
    for tau, rows in ((1.0, 3), (2.0, 1)):
        teacher.calls.clear()
        m = kepo.kepo_backward(tiny_vlm(tokenizer), teacher, r, torch.tensor(
            [2.0, 0, 1, 0, 0, 0, 0, 1]), "kdpo", kepo.KEPOConfig(group_size=2, tau=tau), None, [])
        assert teacher.calls == [("forward", rows)] and m["gate_frac"] == rows / 8
    teacher.calls.clear()
    m = kepo.kepo_backward(tiny_vlm(tokenizer), teacher, r, torch.zeros(8), "kdpo",
                           kepo.KEPOConfig(group_size=2, tau=1.0), None, [])
    assert teacher.calls == [] and m["distill_loss"] == 0.0 and math.isfinite(m["loss"])

def test_rule_a_group_without_a_hint_tag_is_not_sampled(tokenizer):
    rule = lambda i, row: "<hint> look </hint>" if i == 0 else "look at lesion"  # noqa: E731
    student, teacher, prompts, hints, cfg = scripted_step(tokenizer, teacher_rule=rule)
    r = kepo.generate_rollouts(student, tokenizer, prompts, 4, cfg, [])
    out, stats = kepo.knowledge_enhance(student, teacher, tokenizer, r, torch.ones(8), ["B", "A"],
                                        [0, 1], hints, cfg, [])
    assert stats == {"hint_groups": 2, "hint_written": 1, "hint_accept_rate": 0.5, "hint_injected": 2}
    assert student.calls[-1] == ("generate", 2)  # K = 2 samples of group 0 only
    assert out.texts == [answer("b")] * 2 + [answer("c")] * 6


# ---- Multi-GPU: two processes (DDP, FSDP2) step as one process on the global batch ----
WORKER_TIMEOUT = 60  # seconds a rank waits in a collective: a rank left waiting fails

def shard(model):
    """FSDP2, as a sharded trainer would do it: each block transformers keeps whole, then the
    root; `generate` gathers the root's weights like a forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model, reshard_after_forward=True)  # frozen models run no backward
    register_fsdp_forward_method(model, "generate")
    return model

def distributed_worker(mode):
    """`torchrun --nproc_per_node 2 test_kepo.py --worker ddp|shard`: fixed rollouts, each rank
    half of them, loss and gradients against one process on all of them."""
    from torch.distributed.tensor import DTensor
    tok, cfg = make_tokenizer(), kepo.KEPOConfig(group_size=2, micro_batch_size=3)
    teacher, r = tiny_vlm(tok, 48, seed=1), rollouts_of(tok)
    rewards = torch.tensor([2.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0])  # rank 1's first chunk gates none
    single = tiny_vlm(tok)
    loss = kepo.kepo_backward(single, teacher, r, rewards, "kdpo", cfg, None, [])["loss"]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT))
    rank, student = dist.get_rank(), tiny_vlm(tok)
    if mode == "shard":
        student, teacher = shard(student), shard(teacher)
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) \
        if mode == "ddp" else student
    rows = list(range(4 * rank, 4 * rank + 4))
    mean = torch.tensor(kepo.kepo_backward(model, teacher, r.select(rows), rewards[rows], "kdpo",
                                           cfg, None, [])["loss"])
    dist.all_reduce(mean)
    full = torch.cat([(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).flatten()
                      for p in student.parameters() if p.grad is not None])
    print(f"rank {rank}: loss {loss:.8f} {mode} {mean.item() / 2:.8f} "
          f"max grad diff {(full - grads(single)).abs().max().item():.2e}")
    assert abs(mean.item() / 2 - loss) < 1e-6 and (full - grads(single)).abs().max() < 1e-6
    if mode == "shard":
        sharded_work_differs_by_rank(tok, student, teacher, rank)
    del model
    dist.barrier()  # gloo frees finished all_reduces after the caller moves on: drain first
    dist.destroy_process_group()

def sharded_work_differs_by_rank(tok, student, teacher, rank):
    """Sampling where rank 1 stops first, a step where only rank 0 has a cliff group, rejection
    sampling where rank 1 is done at once: every sharded forward still runs on both ranks."""
    prompts = prompt_batch(tok, ["what is shown", "look at lesion"])
    cfg = kepo.KEPOConfig(group_size=2, max_new_tokens=4, max_hint_tokens=4, max_attempts=3)
    others = [i for i in range(len(tok)) if i != tok.eos_token_id] if rank == 1 else []
    out = kepo.generate_rollouts(student, tok, prompts, 2, cfg, others)
    assert rank == 0 or out.completion_ids.shape[1] == 1
    kepo.extract_hint = lambda text: "look"  # the random teacher writes no tags
    kepo.cliff_groups = lambda *args: [0] if rank == 0 else []
    hints = kepo.HintPrompts(prompts.select, lambda idx, h: prompts.select(idx))
    m = kepo.kepo_step(student, torch.optim.SGD(student.parameters(), lr=0.0), tok, prompts,
                       ["a", "b"], cfg, "kepo", teacher, hint_prompts=hints)
    assert m.get("hint_groups", 0) == (1 if rank == 0 else 0), m
    kepo.accuracy_reward = lambda texts, answers: torch.full((len(texts),), float(rank == 1))
    accepted = kepo.rejection_sample(student, tok, prompts, ["a", "b"], cfg, [])
    assert [len(a) for a in accepted] == ([0, 0] if rank == 0 else [2, 2])
    print(f"rank {rank}: sharded work in lockstep")

@pytest.mark.parametrize("mode", ["ddp", "shard"])
def test_two_ranks_step_as_one_process_on_the_global_batch(mode):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.abspath(__file__), "--worker", mode], capture_output=True,
                          text=True, timeout=300)
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
    """The CLI stopped with one line naming the problem, no traceback (exit 2)."""
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
    header = next(line for line in stdout.splitlines() if "mri*" in line)
    assert all(m in header for m in ts.MODALITIES) and "| chance |" in stdout
    assert re.search(r"\| base student names the organ, worst modality \(\w+\) \| [0-9.]+", stdout)
    before = json.loads((out / "smoke-seed1" / "before_rl.json").read_text())
    assert len(before["premises"]) == 6 and set(before["base_describes"]) == set(ts.MODALITIES)
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(m["grad_norm"] > 0 and m["loss"] != 0 and m["reward_std"] > 0 and m["gate_frac"] > 0
               for m in lines) and sum(m.get("hint_groups", 0) for m in lines) > 0
    res = json.loads((out / "smoke-seed1" / "rl-kepo" / "results.json").read_text())
    assert all(0 <= res[k] <= 1 for k in ts.MODALITIES + ["ID", "OOD", "cliff_solved"])
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

def test_compare_runs_every_method_from_one_cached_student(smoke, tmp_path):
    out = copy_of(smoke, tmp_path)
    proc = run_script(*SMOKE, "--out", str(out), "--compare", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ts.METHODS:
        assert f"| rl-{name} |" in proc.stdout and len(metrics(out, f"rl-{name}")) == 2
    assert "stages to train: none" in proc.stdout and "stage 3" not in proc.stdout

def kill_at_first_checkpoint(command, ckpt):
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not ckpt.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait() != 0 and not (ckpt.parent / "results.json").exists(), "it finished first"

def test_killed_run_resumes_exactly_and_never_mixes_settings(smoke, tmp_path):
    out = copy_of(smoke, tmp_path)
    flags, ckpt = [*SMOKE, "--out", str(out)], out / "smoke-seed1" / "rl-kepo" / "ckpt.pt"
    kill_at_first_checkpoint([sys.executable, os.path.join(HERE, "train_small.py"), *flags], ckpt)
    assert refused(run_script(*flags), "holds an unfinished run .*add --resume")
    assert refused(run_script(*flags, "--resume", "--lr", "1e-2"), "lr 0.0003 then, 0.01 now")
    resumed = run_script(*flags, "--resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-3000:]
    assert metrics(out) == metrics(smoke[0]) and not ckpt.exists()
    again = run_script(*flags, "--compare", "--steps", "6")
    assert refused(again, "finished with other settings") or "reused" in again.stdout
    assert refused(run_script(*flags, "--max-new-tokens", "20"), "max_new_tokens 12 then, 20 now")
    a = ts.Args(**ts.PRESETS["smoke"], method="grpo")
    key = {"stages": "same"}
    cfg = lambda a: kepo.KEPOConfig(tau=a.tau)  # noqa: E731  the gate does not shape grpo
    assert ts.run_settings(a, cfg(a), key) == ts.run_settings(replace(a, tau=2.0), cfg(a), key)

def test_a_rebuilt_warm_up_gives_a_fresh_folders_premises(smoke, tmp_path):
    old = copy_of(smoke, tmp_path / "old")
    assert refused(run_script(*SMOKE, "--out", str(old), "--warm-steps", "5", "--steps", "0"),
                   "cached stage .*student_init was built with")
    shutil.rmtree(old / "smoke-seed1" / "student_init")  # as the error says
    rebuilt = run_script(*SMOKE, "--out", str(old), "--warm-steps", "5", "--steps", "0")
    fresh = run_script(*SMOKE, "--out", str(tmp_path / "new"), "--warm-steps", "5", "--steps", "0")
    table = lambda p: p.stdout[p.stdout.index("premises"):p.stdout.index("greedy")]  # noqa: E731
    assert rebuilt.returncode == fresh.returncode == 0 and table(rebuilt) == table(fresh)
    assert table(rebuilt) != smoke[1][smoke[1].index("premises"):smoke[1].index("stage 4")]

@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--batch-prompts", "-1"], "--batch-prompts must be >= 1"),
    (["--steps", "-1"], "--steps and --micro-batch must be >= 0"),
    (["--tau", "5"], r"--tau must be in \[0, 2\]"),
    (["--tau", "nan"], r"--tau must be in \[0, 2\]"),
    (["--lr", "inf"], "--lr must be finite and > 0"),
    (["--lr", "nan"], "--lr must be finite and > 0"),
    (["--teacher-lr", "1e999"], "--teacher-lr must be finite and > 0"),
    (["--seed", "99999999999999999999"], r"--seed must be in \[0, 2\*\*63\)"),
    (["--method", "ppo"], "argument --method: invalid choice"),
    (["--student", "nowhere", "--teacher", "nowhere"], "--student nowhere: not a checkpoint"),
    (["--student", "."], "--student and --teacher go together"),
    (["--data", "x.jsonl"], "--data needs --student and --teacher"),
    (["--device", "tpu"], r"--device tpu: auto, cpu or cuda\[:N\]"),
    (["--out", "a_file"], "--out a_file is a file"),
    (["--out", "a_file/runs"], "--out a_file/runs: cannot write there"),
    pytest.param(["--device", "cuda"], "--device cuda: .* sees no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_flags_are_refused_in_one_line_before_any_work(tmp_path, flags, message):
    (tmp_path / "a_file").write_text("")
    proc = run_script(*SMOKE, "--out", str(tmp_path / "runs"), *flags, cwd=tmp_path)
    assert refused(proc, "^train_small.py: error: " + message), proc.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*"))  # nothing was trained or written

def test_damaged_files_are_named_and_never_trusted(smoke, tmp_path, monkeypatch):
    out = copy_of(smoke, tmp_path, drop=())
    root, stage = out / "smoke-seed1", out / "smoke-teacher"
    for path in (root / "before_rl.json", stage / "stage.json", root / "rl-kepo" / "results.json"):
        path.write_text(path.read_text()[:20])  # truncated
        assert refused(run_script(*SMOKE, "--out", str(out)), f"{path} is damaged")
        shutil.copy(smoke[0] / path.relative_to(out), path)
    (root / "rl-kepo" / "metrics.jsonl").write_text("{")
    with pytest.raises(ts.UserError, match="metrics.jsonl is damaged"):
        ts.read_metrics(root / "rl-kepo")
    (root / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ts.UserError, match="ckpt.pt is damaged"):
        ts.load_checkpoint(root / "ckpt.pt")
    (stage / "model.safetensors").write_bytes(b"not a model")
    assert refused(run_script(*SMOKE, "--out", str(out)), f"{stage} cannot be loaded")
    # a full disk: torch.save says "unexpected pos"; the previous file stays whole
    (tmp_path / "ckpt.pt").write_text("previous")
    monkeypatch.setattr(ts.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(ts.UserError, match="ckpt.pt: the disk is full"):
        ts.write_atomically(tmp_path / "ckpt.pt", lambda p: (open(p, "w").write("x"), 1 / 0)
                            if False else (_ for _ in ()).throw(RuntimeError("unexpected pos 8")))
    assert (tmp_path / "ckpt.pt").read_text() == "previous" and not (tmp_path / "ckpt.pt.tmp").exists()

def test_toy_questions_are_consistent_and_fixed_by_seed():
    a = ts.make_split(3, "train", "mri", 200)
    assert a == ts.make_split(3, "train", "mri", 200) and a != ts.make_split(4, "train", "mri", 200)
    assert {e.qtype for e in a} == set(ts.QUESTIONS)
    for e in a:
        assert e.options[ts.LETTERS.index(e.answer)] == e.evidence.split()[-1]
        target = ts.answer_text(e).replace(" <eos>", "")
        assert kepo.accuracy_reward([target], [e.answer]) + kepo.format_reward([target]) == 2
    proc = ts.build_processor()
    for text in (ts.prompt_text(e), ts.hint_request_text(e), ts.hinted_text(e, e.evidence),
                 ts.describe_text(e.case)):
        assert proc.tokenizer.unk_token not in proc.tokenizer.tokenize(text)

def test_drawn_pixels_equal_the_processor_path():
    proc, exs = ts.build_processor(), ts.make_split(0, "test", "oct", 3)
    texts = [ts.prompt_text(e) for e in exs]
    fast, slow = ts.encode(proc, ts.with_pixels(exs), texts, "cpu"), ts.encode(proc, exs, texts, "cpu")
    assert fast.input_ids.equal(slow.input_ids) and fast.attention_mask.equal(slow.attention_mask)
    torch.testing.assert_close(fast.vision["pixel_values"], slow.vision["pixel_values"],
                               atol=1e-6, rtol=0)

def test_chance_and_the_premises_by_hand():
    q = lambda m, t, n: ts.Example(None, t, "q", tuple("wxyz"[:n]), "a", "", m)  # noqa: E731
    exs = [q("mri", "anatomy", 4), q("mri", "attribute", 2), q("ct", "grading", 3),
           q("ct", "attribute", 3), q("oct", "anatomy", 4)]
    data = ts.Data(["ct", "mri", "oct"], ["anatomy", "grading", "attribute"], "mri", *[[]] * 2,
                   exs, *[[]] * 3, "hand")
    row = ts.summarize(exs, torch.tensor([1 / len(e.options) for e in exs]), data)
    assert row["mri"] == pytest.approx(3 / 8) and row["OOD"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert row["q/attribute"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    r = lambda acc, **k: {m: acc for m in ts.MODALITIES} | {f"q/{t}": acc for t in ts.QUESTIONS} | {  # noqa
        "OOD": acc, "ID": acc} | k
    rows = {"chance": r(0.3), "teacher": r(0.95), "student (before RL)": r(0.6, OOD=0.5, ID=0.7)}
    assert all(p["holds"] for p in ts.premises(rows, 0.2, {m: 0.9 for m in ts.MODALITIES}))
    rows["teacher"]["q/grading"], rows["student (before RL)"]["OOD"] = 0.89, 0.44
    failed = [p["premise"] for p in ts.premises(rows, 0.1, {"oct": 0.8, "ct": 0.9}) if not p["holds"]]
    assert failed == ["teacher accuracy, worst question type (grading)", "warm student OOD accuracy",
                      "learning cliff: train prompts with all G samples wrong",
                      "base student names the organ, worst modality (oct)"]


# ---- Your own data and checkpoints (--data, --student, --teacher) ----
def write_jsonl(folder, per_modality=12):
    """Toy questions as image files and OmniMedVQA-style records (upper-case letters)."""
    lines = []
    for m in ("mri", "ct", "xray"):
        for i, e in enumerate(ts.make_split(5, "jsonl", m, per_modality)):
            ts.draw(e.case).save(folder / f"{m}_{i}.png")
            lines.append(json.dumps({"image": f"{m}_{i}.png", "question": e.question,
                                     "options": list(e.options), "answer": e.answer.upper(),
                                     "modality": m, "qtype": e.qtype}))
    (folder / "omni.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "omni.jsonl", lines

@pytest.mark.parametrize("line,edit,message", [
    (2, lambda r: r.pop("options"), r"missing, empty or mistyped fields \['options'\]"),
    (3, lambda r: r.update(answer="E"), "answer 'E' is not a letter"),
    (5, lambda r: r.update(image="gone.png"), "gone.png"),
    (4, lambda r: r.update(options=["only one"]), "options must be"),
    (6, None, "Expecting|JSON"),
])
def test_a_bad_jsonl_record_names_file_and_line(tmp_path, line, edit, message):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    if edit:
        record = json.loads(lines[line - 1])
        edit(record)
    lines[line - 1] = json.dumps(record) if edit else "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ts.UserError, match=f"{path}:{line}: .*{message}"):
        ts.jsonl_data(ts.Args(data=str(path), student="s", teacher="t"))

def test_not_utf8_and_truncated_images_name_file_and_line(tmp_path):
    path, lines = write_jsonl(tmp_path, per_modality=2)
    image = tmp_path / json.loads(lines[3])["image"]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])  # the header survives
    with pytest.raises(ts.UserError, match=f"{path}:4: .*truncated|{path}:4: .*image"):
        ts.jsonl_data(ts.Args(data=str(path), student="s", teacher="t"))
    path.write_bytes(path.read_bytes().replace(b"what", b"wh\xe4t", 1))
    with pytest.raises(ts.UserError, match=f"{path}:1: not UTF-8"):
        ts.jsonl_data(ts.Args(data=str(path), student="s", teacher="t"))

def test_a_jsonl_test_question_is_never_trained_on_whatever_the_seed(tmp_path):
    path, _ = write_jsonl(tmp_path)
    splits = [ts.jsonl_data(ts.Args(**ts.PRESETS["smoke"], data=str(path), seed=s, student="s",
                                    teacher="t")) for s in (1, 2)]
    key = lambda e: (e.image, e.question)  # noqa: E731
    assert [key(e) for e in splits[0].test] == [key(e) for e in splits[1].test]
    assert not {key(e) for e in splits[0].test} & {key(e) for e in splits[0].train}
    assert len(splits[0].test) == 3 * 2  # 20% of 12, per modality

def chat_words():
    """The words a chat checkpoint is asked in (instructions, toy questions and options)."""
    e = ts.make_split(0, "words", "mri", 1)[0]
    texts = [ts.prompt_text(e, True), ts.hint_request_text(e, True), ts.hinted_text(e, "x", True)]
    words = {w for t in texts for w, _ in ts.WORD_SPLIT.pre_tokenize_str(t.lower())}
    vocab = ts.build_processor().tokenizer.get_vocab()
    return sorted(words | {w for w in vocab if w[0] != "<"})

TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "{{ image }} {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{{ end }}")

def save_checkpoint(path, family, hidden, seed, end=""):
    """A tiny checkpoint of `family`, saved with its processor and a chat template (bf16, as
    released checkpoints are; its tokenizer saved right-padded, as some are)."""
    template = TEMPLATE.replace("{{ end }}", end)
    if family == "gemma3":
        model, proc = gemma3_and_processor(seed, chat_words(), template.replace(
            "{{ image }}", "<start_of_image>"))
    else:
        tok = make_tokenizer(words=chat_words())
        proc = tr.LlavaProcessor(tr.SiglipImageProcessor(size={"height": 16, "width": 16}), tok,
                                 patch_size=8, vision_feature_select_strategy="full",
                                 num_additional_image_tokens=0,
                                 chat_template=template.replace("{{ image }}", "<image>"))
        model = tiny_vlm(tok, hidden, seed)
    proc.tokenizer.padding_side = "right"
    model.to(torch.bfloat16).save_pretrained(path)
    proc.save_pretrained(path)

@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_the_readme_checkpoint_command_runs_on_a_fresh_out(tmp_path, family):
    """README: python train_small.py --data omni.jsonl --student ckpt/student --teacher ckpt/teacher"""
    readme = open(os.path.join(HERE, "README.md")).read()
    command = re.search(r"python train_small.py (--data omni.jsonl --student \S+ --teacher \S+)",
                        readme).group(1).split()
    write_jsonl(tmp_path)
    save_checkpoint(tmp_path / "ckpt" / "student", family, 32, 0)
    save_checkpoint(tmp_path / "ckpt" / "teacher", family, 48, 1)
    proc = run_script(*command, *SMOKE, "--steps", "2", "--max-new-tokens", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rl-kepo |" in proc.stdout and "ct" in proc.stdout and "fundus" not in proc.stdout
    run = tmp_path / "runs" / "smoke-omni-student-seed1" / "rl-kepo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)
    assert set(json.loads((run / "results.json").read_text())) >= {"ct", "mri", "xray", "OOD"}

def test_a_checkpoint_is_padded_left_asked_in_words_and_loaded_in_fp32(tmp_path):
    save_checkpoint(tmp_path / "s", "gemma3", 32, 0)
    proc, teacher, student = ts.checkpoints(ts.Args(student=str(tmp_path / "s"),
                                                    teacher=str(tmp_path / "s"), device="cpu"))
    assert proc.tokenizer.padding_side == "left"  # saved right-padded
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # saved in bf16
    exs = ts.make_split(1, "train", "mri", 2)  # nested images: Gemma 3 refuses a flat list
    batch = ts.student_prompts(proc, exs, "cpu")
    assert (batch.attention_mask[:, -1] == 1).all() and "token_type_ids" in batch.vision
    hinted = ts.hint_prompts(exs, proc, "cpu").hinted([1], ["size large"])
    for ask, ids in ((ts.STUDENT_ASK, batch.input_ids[-1]), (ts.HINTED_ASK.format(
            hint="size large", letter=exs[1].answer), hinted.input_ids[0])):
        tokens = " ".join(proc.tokenizer.convert_ids_to_tokens(ids))
        assert " ".join(proc.tokenizer.tokenize(ask)) in tokens and "<unk>" not in tokens

def test_a_processors_labels_are_not_forwarded():
    """PaliGemma's processor returns labels; the forward would score the prompt against them."""
    proc = paligemma_and_processor()[1]
    batch = ts.encode(proc, ts.make_split(1, "train", "mri", 2), ["what"] * 2, "cpu")
    assert "labels" not in batch.vision and "token_type_ids" in batch.vision

def test_a_thinking_template_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "s", "llava", 32, 0, end=" <think>")
    proc = run_script(*SMOKE, "--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "s"),
                      "--out", str(tmp_path / "runs"))
    assert refused(proc, "opens <think> .*Instruct checkpoint"), proc.stderr[-2000:]


if __name__ == "__main__":  # torchrun runs this file as the two-process worker
    distributed_worker(sys.argv[sys.argv.index("--worker") + 1])
