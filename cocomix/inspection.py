"""
Which concepts a CoCoMix student predicts, token by token: a table for the terminal and a
self-contained HTML page (inline CSS, no scripts) with every token coloured by its top concept and
its top concepts on hover. sample.py's --inspect and --html; scripts/measure_steering.py reads the
same concept logits.
"""

import html
import sys

import torch

from cocomix.dictionary import concept_name
from cocomix.weights import write_atomic


def has_concept_head(model):
    return getattr(model.config, "n_concepts", 0) > 0 and hasattr(model, "mixer")


def windowed(fn, idx, bs):
    """fn (B, t <= bs) -> (B, t, ...) applied to idx (B, T) of any length: windows of bs tokens,
    each token past the first window seeing at least half a window of context."""
    outs, T, step = [fn(idx[:, :bs])], idx.size(1), max(1, bs // 2)
    for s in range(bs, T, step):
        e = min(s + step, T)
        outs.append(fn(idx[:, max(0, e - bs) : e])[:, -(e - s) :])
    return torch.cat(outs, dim=1)


@torch.no_grad()
def concept_logits(model, idx, steer=None):
    """Concept logits z (B, T, C) at insert_layer for every token of idx (B, T)."""
    z = lambda w: model.hidden_states(w, steer or None)[1]
    return windowed(z, idx, model.config.block_size).float()


def token_text(enc, tok):
    return enc.decode_single_token_bytes(tok).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# per token, in the terminal


def inspect_tokens(model, ids, n_prompt, steer=None, top=3, names=None):
    """Per token: {'pos', 'token' (id), 'prompt' (bool), 'concepts': [(id, logit, label), ...] best
    first}."""
    z = concept_logits(
        model, torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device), steer
    )[0]
    vals, inds = z.topk(min(top, z.size(-1)), dim=-1)
    names = names or {}
    rows = []
    for t, tok in enumerate(ids):
        cs = [
            (int(i), float(v), concept_name(names.get(int(i))))
            for v, i in zip(vals[t].tolist(), inds[t].tolist())
        ]
        rows.append({"pos": t, "token": tok, "prompt": t < n_prompt, "concepts": cs})
    return rows


def format_inspection(rows, enc, title):
    lines = [
        f"== concepts: {title} (top {len(rows[0]['concepts']) if rows else 0} predicted at "
        "insert_layer; '>' marks generated tokens) =="
    ]
    for r in rows:
        cs = ", ".join(
            f"{i}:{v:+.2f}" + (f" [{name}]" if name else "") for i, v, name in r["concepts"]
        )
        lines.append(
            f"{r['pos']:5d} {' ' if r['prompt'] else '>'} {token_text(enc, r['token'])!r:18} {cs}"
        )
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the HTML page


def concept_colour(cid):
    # golden-angle hues: neighbouring ids look different
    return f"hsl({(cid * 137.508) % 360:.1f}, 70%, 82%)"


HTML_HEAD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>CoCoMix concepts</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
  padding: 1em; }
/* scroll-margin: a #rNtM link lands 40% down the window, context above it, and near the top does
   not scroll */
.tok { position: relative; border-radius: 3px; padding: 1px 0; cursor: default;
  scroll-margin-top: 40vh; }
.nl { color: #999; }
.tok.prompt { text-decoration: underline dotted #888; }
.tok:hover { outline: 2px solid #333; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.8em; z-index: 10; background: #222;
  color: #eee; font-size: 12px; padding: 6px 8px; border-radius: 4px; white-space: pre; }
.tok:hover .tip, .tok:target .tip { display: block; }
.tok:target { outline: 2px solid #c00; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
</style></head><body>
"""


def visible(text):
    """A newline alone would leave its token no coloured area to see or hover: show it as a grey
    arrow too."""
    return html.escape(text).replace("\n", '<span class="nl">\u21b5</span>\n')


def html_page(runs, enc):
    """runs: [(title, rows)] -> a self-contained page (inline CSS only, no scripts or external
    files). Token pos of run r has id r{r}t{pos}: page.html#r0t5 opens with its concepts shown, as
    on hover (for links and headless screenshots, which cannot hover)."""
    out = [
        HTML_HEAD,
        "<h1>Predicted concepts per token</h1>",
        "<p>Each token is coloured by its top predicted concept (logits of the concept head at "
        "insert_layer); hover for the top concepts. Dotted underline: prompt.</p>",
    ]
    for n, (title, rows) in enumerate(runs):
        out.append(f'<h2>{html.escape(title)}</h2><div class="text">')
        counts = {}
        for r in rows:
            cid, v, name = r["concepts"][0]
            counts[cid] = (counts.get(cid, (0, name))[0] + 1, name)
            tip = "\n".join(f"{i}: {val:+.3f}  {nm}" for i, val, nm in r["concepts"])
            where = " (prompt)" if r["prompt"] else ""
            tip = f"pos {r['pos']} token {r['token']} {token_text(enc, r['token'])!r}{where}\n{tip}"
            out.append(
                f'<span id="r{n}t{r["pos"]}" class="tok{" prompt" if r["prompt"] else ""}" '
                f'style="background:{concept_colour(cid)}" '
                f'title="{html.escape(tip)}">{visible(token_text(enc, r["token"]))}'
                f'<span class="tip">{html.escape(tip)}</span></span>'
            )
        out.append("</div><table><tr><th>concept</th><th>name</th><th>tokens it tops</th></tr>")
        for cid, (n, name) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
            out.append(
                f'<tr><td style="background:{concept_colour(cid)}">{cid}</td>'
                f"<td>{html.escape(name)}</td><td>{n}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>\n")
    return "".join(out)


# -----------------------------------------------------------------------------


def inspect_runs(model, runs, n_prompt, enc, names, top=3, html_path=""):
    """sample.py's --inspect/--html: for every sample of the runs [(title, generating model, steer,
    seqs)] that `model` generated, its top concepts per token printed, and all of them on one page
    at html_path."""
    if names and len(names) != model.config.n_concepts:
        print(
            f"# warning: the concept dictionary has {len(names)} entries, the model "
            f"{model.config.n_concepts} concepts",
            file=sys.stderr,
        )
    pages = []
    for title, m, st, seqs in runs:
        if m is not model:  # the concept source has no concept head to inspect
            continue
        for s, seq in enumerate(seqs):
            t = title + (f" #{s}" if len(seqs) > 1 else "")
            rows = inspect_tokens(model, seq, n_prompt, st, top, names)
            print(format_inspection(rows, enc, t))
            pages.append((t, rows))
    if html_path:
        write_atomic(html_path, html_page(pages, enc))  # a full disk leaves no empty page
        print(f"# wrote {html_path}", file=sys.stderr)
    return pages
