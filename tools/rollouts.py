"""KEPO's rollout log and its page: single rollouts, hints and injections.

    python tools/rollouts.py runs/cpu-seed1/rl-kepo   # writes rollouts.html there

train_small.py calls `records` on the trace of each logged RL step (step 1, every
--eval-every steps, the last) and appends them to the run's rollouts.jsonl, one JSON
record per prompt group; at the end of the run it calls `write_page`. A record:
    step, group, question, options, answer, modality, qtype
    image       {"case": the toy case} or {"path": an image file}
    rollouts    the G rollouts as the step scored them: text, tokens, accuracy,
                format, reward, advantage, gated (r >= tau; all for opd, none for
                grpo); for a gated one, token_text and jsd (the per-token JSD to
                the teacher that the distillation sum added); for an injected one,
                injected = {hinted: its index in `hinted`, replaced_text,
                replaced_reward}
    hint        only in a hinted group: the teacher's hint (null: no <hint> tag)
    hinted      only there: each hinted sample's text, correct and accepted
    loss        the step's loss parts, as in metrics.jsonl
The page is one HTML file that opens offline: images inline, no script, no link out.
"""
import base64
import html
import io
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kepo  # noqa: E402

LOSS_PARTS = ("loss", "policy_loss", "distill_loss", "kl")
IMAGE_PIXELS = 144  # the image's side on the page
JSD_FULL = math.log(2)  # a token's JSD shaded fully: the JSD's bound (nats)
STYLE = """
body { font: 14px/1.4 sans-serif; margin: 1em 2em; color: #222 }
nav a, nav span { margin-right: .8em }
.group { border: 1px solid #ccc; padding: .4em .8em; margin: .6em 0 }
.group.hinted { border-color: #c60 }
img { width: %dpx; image-rendering: pixelated; float: right; margin-left: 1em }
table { border-collapse: collapse; margin: .4em 0 }
td, th { border: 1px solid #ddd; padding: 2px 6px; vertical-align: top; text-align: left }
.text { font-family: monospace; white-space: pre-wrap }
.old { color: #888; text-decoration: line-through }
.yes { color: #070 } .no { color: #b00 }
""" % IMAGE_PIXELS


def reward(text, answer):
    """r = accuracy + format of one completion, as kepo.py scores it."""
    return (kepo.accuracy_reward([text], [answer]) + kepo.format_reward([text])).item()


def image_of(example):
    if example.case is not None:
        return {"case": asdict(example.case)}
    return {"path": example.image}


def rows_of(trace, b, g, answer, tokenizer):
    """Group b's G rollouts, as the step scored them."""
    r, gate, hinted = trace["rollouts"], trace["gate"], trace.get("hinted", {})
    jsd = dict(zip(gate.nonzero().flatten().tolist(), trace["jsd"]))
    rows = []
    for i in range(b * g, (b + 1) * g):
        ids = r.completion_ids[i][r.completion_mask[i].bool()]
        text = r.texts[i]
        row = {"text": text, "tokens": len(ids),
               "accuracy": kepo.accuracy_reward([text], [answer]).item(),
               "format": kepo.format_reward([text]).item(),
               "reward": trace["rewards"][i].item(),
               "advantage": trace["advantages"][i].item(), "gated": bool(gate[i])}
        if i in jsd:
            row |= {"token_text": tokenizer.convert_ids_to_tokens(ids.tolist()),
                    "jsd": jsd[i].tolist()}
        if i in trace.get("replaced", {}):
            _, j, old = trace["replaced"][i]
            kept = [k for k, s in enumerate(hinted[b]) if s.kept]
            row["injected"] = {"hinted": kept[j], "replaced_text": old,
                               "replaced_reward": reward(old, answer)}
        rows.append(row)
    return rows


def records(step, examples, trace, metrics, tokenizer):
    """One record per prompt group of a step that kepo_step traced."""
    g = len(trace["rewards"]) // len(examples)
    loss = {k: metrics[k] for k in LOSS_PARTS if k in metrics}
    out = []
    for b, e in enumerate(examples):
        rec = {"step": step, "group": b, "question": e.question,
               "options": list(e.options), "answer": e.answer, "modality": e.modality,
               "qtype": e.qtype, "image": image_of(e),
               "rollouts": rows_of(trace, b, g, e.answer, tokenizer)}
        if b in trace.get("hints", {}):
            rec["hint"] = trace["hints"][b]
            rec["hinted"] = [{"text": s.text, "correct": s.correct, "accepted": s.kept}
                             for s in trace["hinted"].get(b, [])]
        out.append(rec | {"loss": loss})
    return out


def summary(recs, k):
    """Two console lines about the step's first hinted group, or ''."""
    r = next((r for r in recs if "hint" in r), None)
    if r is None:
        return ""
    kept = sum(h["accepted"] for h in r["hinted"])
    return (f"    hinted: {r['question']} ({', '.join(r['options'])}; answer "
            f"{r['answer']})\n      hint {r['hint']!r}: {kept} of K = {k} kept "
            f"({len(r['hinted'])} drawn)")


def png(image):
    """A data: URL of a toy case drawn, or of an image file."""
    if "case" in image:
        import train_small  # the toy's drawing
        case = image["case"] | {"slots": tuple(map(tuple, image["case"]["slots"]))}
        picture = train_small.draw(train_small.Case(**case))
    else:
        from PIL import Image
        picture = Image.open(image["path"]).convert("RGB")
        picture.thumbnail((IMAGE_PIXELS, IMAGE_PIXELS))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def shaded(row):
    """The completion's text, escaped: a gated one's tokens shaded by JSD."""
    if "jsd" not in row:
        return html.escape(row["text"])
    spans = []
    for token, value in zip(row["token_text"], row["jsd"]):
        alpha = min(value / JSD_FULL, 1.0)
        spans.append(f'<span style="background:rgba(220,60,0,{alpha:.2f})" '
                     f'title="JSD {value:.4f}">{html.escape(token)}</span>')
    return " ".join(spans)


def mark(ok):
    return '<span class="yes">✓</span>' if ok else '<span class="no">✗</span>'


def rollout_table(rec):
    head = ("#", "completion", "tokens", "acc", "fmt", "reward", "advantage", "gate")
    lines = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rec["rollouts"]):
        text = f'<div class="text">{shaded(row)}</div>'
        if "injected" in row:
            inj = row["injected"]
            text += (f'<div class="text old">replaced (r = {inj["replaced_reward"]:g}): '
                     f'{html.escape(inj["replaced_text"])}</div>'
                     f'<div>injected: hinted sample {inj["hinted"]}</div>')
        cells = (i, text, row["tokens"], mark(row["accuracy"]), mark(row["format"]),
                 f'{row["reward"]:g}', f'{row["advantage"]:+.2f}', mark(row["gated"]))
        lines.append('<tr class="rollout">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return lines + ["</table>"]


def hint_block(rec):
    hint = rec["hint"]
    lines = [f"<p><b>hint</b>: " + ("<i>no &lt;hint&gt; tag: not sampled</i>" if hint is None
                                    else f'<span class="text">{html.escape(hint)}</span>')
             + "</p>", "<table><tr><th>hinted sample</th><th>correct</th><th>kept</th></tr>"]
    for i, h in enumerate(rec["hinted"]):
        lines.append(f'<tr><td class="text">{i}: {html.escape(h["text"])}</td>'
                     f'<td>{mark(h["correct"])}</td><td>{mark(h["accepted"])}</td></tr>')
    return lines + ["</table>"]


def group_block(rec, image):
    hinted = "hint" in rec
    options = ", ".join(f"{chr(97 + i)}: {html.escape(o)}" for i, o in enumerate(rec["options"]))
    lines = [f'<div class="group{" hinted" * hinted}" id="s{rec["step"]}g{rec["group"]}">',
             f'<img src="{image}" alt="the image">',
             f'<p><b>group {rec["group"]}</b> ({html.escape(rec["modality"])}, '
             f'{html.escape(rec["qtype"])}): {html.escape(rec["question"])}<br>'
             f'{options}; answer <b>{html.escape(rec["answer"])}</b></p>']
    lines += hint_block(rec) if hinted else []
    return lines + rollout_table(rec) + ['<div style="clear:both"></div></div>']


def page(recs):
    """The whole page, as text."""
    steps = sorted({r["step"] for r in recs})
    nav = ["<nav><b>steps</b>: "] + [f'<a href="#s{s}">{s}</a>' for s in steps] + ["</nav>"]
    hinted = [r for r in recs if "hint" in r]
    nav += ["<nav><b>hinted groups</b>: "] + [
        f'<a href="#s{r["step"]}g{r["group"]}">{r["step"]}/{r["group"]}</a>'
        for r in hinted] + (["<span>none</span>"] if not hinted else []) + ["</nav>"]
    body, images = [], {}
    for s in steps:
        group = [r for r in recs if r["step"] == s]
        loss = ", ".join(f"{k} {v:.4f}" for k, v in group[0]["loss"].items())
        body += [f'<h2 id="s{s}">step {s}</h2><p>{loss}</p>']
        for r in group:
            key = json.dumps(r["image"], sort_keys=True)
            images.setdefault(key, png(r["image"]))
            body += group_block(r, images[key])
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      "<title>KEPO rollouts</title>", f"<style>{STYLE}</style></head><body>",
                      "<h1>KEPO rollouts</h1>", *nav, *body, "</body></html>"])


def write_page(folder):
    """folder/rollouts.html from folder/rollouts.jsonl; returns its path."""
    lines = Path(folder, "rollouts.jsonl").read_text().splitlines()
    path = Path(folder, "rollouts.html")
    path.write_text(page([json.loads(x) for x in lines]))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "rollouts.jsonl").is_file():
        sys.exit("usage: python tools/rollouts.py RUN_FOLDER (one with a rollouts.jsonl)")
    print(write_page(sys.argv[1]))
