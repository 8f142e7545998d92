"""
train.py's plumbing, kept out of it so that hardening never hides the method: checks of its settings
(each returns a one-line message for the first problem found, or None), the device and precision
chosen by default, and the random-number state that makes a resumed run exact.
"""

import os
import random

import numpy as np
import torch

MODES = ("ntp", "cocomix", "kd", "pause")
STUDENT_MIX = ("interleave", "add", "none")  # pause is a mode of its own, not a mixing rule


def check_config(c):
    """Settings that are wrong whatever the data and models: c is train.py's config dict."""
    if c["mode"] not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {c['mode']!r}"
    if c["mode"] == "cocomix" and c["mix"] not in STUDENT_MIX:
        return f"mix must be one of {', '.join(STUDENT_MIX)} (for the pause baseline use --mode=pause), got {c['mix']!r}"
    if min(c["batch_size"], c["block_size"], c["gradient_accumulation_steps"], c["max_iters"] + 1) <= 0:
        return "batch_size, block_size and gradient_accumulation_steps must be positive, max_iters non-negative"
    if c["mode"] in ("cocomix", "kd") and not c["concept_source"]:
        return f"mode={c['mode']} needs --concept_source (a checkpoint of ours or a GPT-2 folder)"
    if c["mode"] == "cocomix" and not c["sae_path"]:
        return "mode=cocomix needs --sae_path (an SAE trained by sae.py, or OpenAI's)"
    return None


def check_source(source, vocab_size, block_size, concept_source):
    """The concept source (or KD teacher) against the data and the student's window."""
    if source.config.vocab_size != vocab_size:
        return f"concept source {concept_source} has vocab {source.config.vocab_size}, the data is GPT-2 BPE ({vocab_size})"
    if source.config.block_size < block_size:
        return f"block_size={block_size} is longer than the concept source's context ({source.config.block_size})"
    return None


def check_resume(checkpoint, model_args, config, ckpt_path):
    """A resumed run must be the run that wrote the checkpoint: same model and objective."""
    changed = {k: (checkpoint['model_args'].get(k), v) for k, v in model_args.items() if checkpoint['model_args'].get(k) != v}
    old = checkpoint.get('config', {})
    changed.update({k: (old[k], config[k]) for k in ('mode', 'label_rule', 'concept_source', 'sae_path', 'seed')
                    if k in old and old[k] != config[k]})
    if changed:
        return f"resume config disagrees with {ckpt_path}: " + ", ".join(f"{k}={b!r} (checkpoint: {a!r})" for k, (a, b) in changed.items())
    return None


def auto_device(device):
    if device != 'auto':
        return device
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def auto_dtype(dtype, device_type):
    """bf16 on GPUs that have it (else fp16 with a gradient scaler) and on CPUs with native bf16
    (AVX512-BF16/AMX; emulated bf16 is slower than fp32); fp32 elsewhere."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if device_type == 'cpu' and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 'bfloat16'
    return 'float32'


def rng_state(device_type):
    """Every generator a step draws from, as plain Python values (the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy': [name, keys.tolist(), pos, has_gauss, cached],
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}


def set_rng_state(rng, device_type):
    torch.set_rng_state(rng['torch'])
    random.setstate(rng['python'])
    name, keys, pos, has_gauss, cached = rng['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if rng.get('cuda') is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'])


def init_processes(device, backend, gradient_accumulation_steps):
    """(ddp, rank, local_rank, world_size, device): one process, or one of torchrun's (RANK is set)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    from torch.distributed import init_process_group
    if backend == 'auto':
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
    init_process_group(backend=backend)
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the {world_size} processes")
    return True, rank, local_rank, world_size, device


def make_labeler(source, sae_path, sae_layer, k_attr, label_rule, n_concepts, device):
    """The attribution labeler (concepts.py) from the concept source and an SAE file; (labeler, C)."""
    from concepts import ConceptLabeler
    from sae import SAE
    sae = SAE.load(sae_path, layer=sae_layer if sae_layer >= 0 else None).to(device)
    if sae.meta.get('layer') is None:
        raise ValueError(f"{sae_path} does not say which layer it was trained on: pass --sae_layer")
    if n_concepts and n_concepts != sae.n_latents:
        raise ValueError(f"n_concepts={n_concepts} but the SAE has {sae.n_latents} latents")
    return ConceptLabeler(source, sae, sae.meta['layer'], k_attr, label_rule), sae.n_latents


def label_cache_note(label_caches, record):
    """Windows so far (this process) whose labels came from disk / were computed: into the log record,
    and as text for the eval line."""
    if not label_caches:
        return ""
    record['label_hits'] = sum(c.hits for c in label_caches.values())
    record['label_computed'] = sum(c.misses for c in label_caches.values())
    return f", labels cached {record['label_hits']}/{record['label_hits'] + record['label_computed']}"
