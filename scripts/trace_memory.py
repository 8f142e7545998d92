"""
One training step of a train.py config at full size, run on fake tensors (cocomix/memory.py): its
device memory as a GPU would see it, against the estimate train.py checks before a CUDA run
(cocomix/memory.py, step_memory), and the largest micro-batch that fits each card.

    python -m scripts.trace_memory                                  # every config/gpu_* preset
    python -m scripts.trace_memory config/gpu_69m_cocomix.py

The step is train.py's: model.Objective's forward under autocast (bf16 for dtype 'auto'), after
the concept labeler (sae.ConceptLabeler) for cocomix or the teacher for kd, the backward, gradient
clipping and a fused AdamW step, with the AdamW moments of a step after the first. The concept
source is GPT-2 124M's shape, the SAE OpenAI's 32k at block 5, both with random weights: memory
does not depend on their values. label_fill='released' has a data-dependent shape, which fake
tensors cannot trace.
"""

import argparse
import glob
import os

import torch

from cocomix.checks import CUDA_SLACK
from cocomix.memory import as_on_cuda, fake_tensors, largest_batch, step_memory, traced_peak
from model import GPT, GPTConfig, Objective, teacher_of
from sae import SAE, ConceptLabeler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
SAE_32K = dict(n_latents=32768, k=32)  # OpenAI's GPT-2 SAEs: 32,768 latents, k = 32
VOCAB = 50257


def frozen_shapes(c):
    """(the concept source's (n_layer, n_embd), C) that trace_step builds for c's mode."""
    coco, frozen = c["mode"] == "cocomix", c["mode"] in ("cocomix", "kd")
    shape = (GPT2_124M["n_layer"], GPT2_124M["n_embd"]) if frozen else None
    return shape, SAE_32K["n_latents"] if coco else 0


def preset(path):
    """train.py's settings for a config file: its defaults, then the file, run from the repository
    root as train.py runs it (the files exec their base files by relative path)."""
    src = open(os.path.join(ROOT, "train.py")).read()
    c, cwd = {}, os.getcwd()
    exec(src[src.index("# ---") : src.index("config_keys = ")], c)
    os.chdir(ROOT)
    try:
        exec(open(path).read(), c)
    finally:
        os.chdir(cwd)
    return {k: v for k, v in c.items() if isinstance(v, (int, float, bool, str)) and k[0] != "_"}


def model_args(c, n_concepts):
    """The student's GPTConfig as train.py builds it from the settings."""
    args = dict(
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=c["n_embd"],
        block_size=c["block_size"],
        bias=c["bias"],
        vocab_size=VOCAB,
        dropout=c["dropout"],
    )
    if c["mode"] == "cocomix":
        args.update(
            n_concepts=n_concepts,
            concept_topk=c["concept_topk"],
            insert_layer=c["insert_layer"],
            mix=c["mix"],
        )
    elif c["mode"] == "pause":
        args.update(insert_layer=c["insert_layer"], pause=True)
    return args


def trace_step(c, source_args=GPT2_124M, sae_args=SAE_32K):
    """One micro-batch and optimizer step of train.py's settings c on fake tensors, as on CUDA
    (as_on_cuda), under c's autocast (bf16 for 'auto'): (peak bytes, {MemTracker category: bytes},
    [the trainable parameters whose gradient is missing or of another shape or dtype]). With
    gradient accumulation the micro-batch is a later one: the earlier ones' gradients are held."""
    B, T, C = c["batch_size"], c["block_size"], sae_args["n_latents"]
    with fake_tensors(), as_on_cuda():
        model = GPT(GPTConfig(**model_args(c, C)))
        betas = (c["beta1"], c["beta2"])
        optimizer = model.configure_optimizers(
            c["weight_decay"], c["learning_rate"], betas, "cuda", decay_all=c["decay_all"]
        )
        assert optimizer.defaults["fused"]
        for p in model.parameters():  # AdamW's moments, made by the first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if c["gradient_accumulation_steps"] > 1:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        objective = Objective(model, c["mode"], c["lam"], c["lam_kd"])
        frozen, labeler = [], None
        if c["mode"] in ("cocomix", "kd"):
            source = GPT(GPTConfig(**source_args)).eval().requires_grad_(False)
            frozen.append(source)
        if c["mode"] == "cocomix":
            sae = SAE(source_args["n_embd"], C, sae_args["k"], meta={"layer": c["sae_layer"]})
            labeler = ConceptLabeler(
                source, sae, c["sae_layer"], c["k_attr"], c["label_rule"], c["label_fill"]
            )
            frozen.append(sae.requires_grad_(False))
        X, Y = torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T))
        # train.py's precision on a GPU: 'auto' is bf16 where the GPU has it
        dtype = {"float32": None, "float16": torch.float16}.get(c["dtype"], torch.bfloat16)
        bad = []

        def step():  # train.py's micro-batch (step_loss) and its optimizer step
            labels, teacher = None, None
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                if labeler is not None:
                    labels = labeler(X, Y)
                elif c["mode"] == "kd":
                    with torch.no_grad():
                        teacher = teacher_of(source, X)
                loss, parts = objective(X, Y, labels, teacher)
            (loss / c["gradient_accumulation_steps"]).backward()
            bad.extend(
                name
                for name, p in model.named_parameters()
                if p.requires_grad
                and (p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype)
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        peak, parts = traced_peak(step, model, optimizer, *frozen)
    return peak, parts, bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("configs", nargs="*", help="train.py config files (default: config/gpu_*.py)")
    p.add_argument("--parts", action="store_true", help="MemTracker's categories at each peak")
    a = p.parse_args(argv)
    paths = a.configs or sorted(glob.glob(os.path.join(ROOT, "config", "gpu_*.py")))
    gib = 2**30
    print("| preset | estimate GiB | fake-tensor GiB | batch_size fitting 80 / 40 / 24 GiB |")
    print("|---|---|---|---|")
    for path in paths:
        c = preset(path)
        peak, parts, bad = trace_step(c)
        est = step_memory(c, VOCAB, *frozen_shapes(c))
        frozen = frozen_shapes(c)
        fits = []
        for card in (80, 40, 24):  # GiB; the estimate with train.py's slack
            fit = lambda s: CUDA_SLACK * step_memory(s, VOCAB, *frozen) <= card * gib
            fits.append(c["batch_size"] if fit(c) else (largest_batch(c, fit) or ("none",))[0])
        name = os.path.basename(path)[:-3]
        print(
            f"| {name} | {est / gib:.1f} | {peak / gib:.1f} | {' / '.join(map(str, fits))} |"
            + (f" missing gradients: {bad}" if bad else "")
        )
        if a.parts:
            print("    at the peak, GiB:", {k: round(v / gib, 2) for k, v in parts.items() if v})


if __name__ == "__main__":
    main()
