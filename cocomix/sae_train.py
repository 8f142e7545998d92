"""
Training and evaluating a TopK SAE (sae.py) on the residual stream of a frozen GPT: the activation
stream, its shuffling buffer, the loss (FVU + AuxK, Gao et al. 2024), the Adam loop with the
decoder's unit-norm constraint, and the held-out evaluation (FVU, L0, dead latents, delta CE).

This file never imports sae.py, so that sae.py's command line can import it: it takes an SAE object
and uses only what any torch module has plus its sizes (d, n_latents), pre_bias and methods
(encode_pre, topk, decode_latents, decode_sparse, normalise_decoder, project_decoder_grad). The
equations are in docs/method.md.
"""

import signal
import time

import numpy as np
import torch
import torch.nn.functional as F

from cocomix.corpus import load_tokens
from cocomix.progress import progress_bar

# -----------------------------------------------------------------------------
# Activations: the host's hidden states on windows of the token files


def val_windows(data, T, tokens, B):
    """Consecutive non-overlapping windows of T+1 tokens (inputs and shifted targets) from the start
    of `data`, in batches of B: yields (start offsets, (b, T+1) int64). Deterministic, so evals
    compare."""
    n = min(max(tokens // T, 1), (len(data) - 1) // T)
    if n < 1:
        raise ValueError(
            f"the held-out split has {len(data)} tokens, fewer than one window of {T + 1}"
        )
    for s in range(0, n, B):
        starts = [i * T for i in range(s, min(s + B, n))]
        yield (
            starts,
            torch.from_numpy(np.stack([data[i : i + T + 1].astype(np.int64) for i in starts])),
        )


@torch.no_grad()
def activation_chunk(model, layer, data, T, B, seed, c, device="cpu"):
    """Chunk c of the activation stream: hidden states after block `layer` on B windows of T tokens
    at random offsets, (B*T, d), in fp32 (sae.py standardises them). A pure function of (seed, c),
    so a resumed run can recompute any chunk."""
    ix = np.random.default_rng([seed, c]).integers(0, len(data) - T + 1, B).tolist()
    h = model.forward_to(
        torch.from_numpy(np.stack([data[i : i + T].astype(np.int64) for i in ix])).to(device), layer
    )
    return h.float().view(-1, h.size(-1))


class ShuffleBuffer:
    """Minibatches drawn at random from a pool of `size` activations. Neighbouring tokens of one
    window are highly correlated, so a minibatch straight from the host would be a few documents;
    the pool mixes many. Once half the pool has been served, the served rows are replaced by fresh
    ones. Row i of the stream is row i % chunk_rows of `chunk(i // chunk_rows)`, and the pool keeps
    the number of each row it holds: its state is then a few index tensors (the pool itself is GBs
    at GPT-2 scale), and a resume rebuilds it exactly at the cost of one host pass per chunk still
    in it (~log2(chunk_rows)/2 pools)."""

    def __init__(self, chunk, chunk_rows, size, batch_size, gen, state=None):
        if batch_size > size // 2:
            raise ValueError(f"batch_size={batch_size} must be at most half the buffer ({size})")
        self.chunk, self.chunk_rows, self.batch_size, self.gen, self.cached = (
            chunk,
            chunk_rows,
            batch_size,
            gen,
            (None, None),
        )
        if state is None:
            self.ids, self.next = torch.arange(size), size
            self.reshuffle()
        else:
            self.ids, self.order, self.pos, self.next = (
                state["ids"],
                state["order"],
                state["pos"],
                state["next"],
            )
            gen.set_state(state["gen"])
        self.pool = self.rows(self.ids)

    def state_dict(self):
        return {
            "ids": self.ids.clone(),
            "order": self.order.clone(),
            "pos": self.pos,
            "next": self.next,
            "gen": self.gen.get_state(),
        }

    def rows(self, ids):
        """The activations numbered `ids`, one host pass per chunk; the last chunk is kept, since
        one refill ends in the chunk where the next begins."""
        chunk_of, out = ids // self.chunk_rows, None
        for c in chunk_of.unique().tolist():
            if self.cached[0] != c:
                self.cached = (c, self.chunk(c))
            x, m = self.cached[1], chunk_of == c
            out = x.new_empty(len(ids), x.size(1)) if out is None else out
            out[m.to(x.device)] = x[(ids[m] % self.chunk_rows).to(x.device)]
        return out

    def reshuffle(self):
        self.order, self.pos = torch.randperm(len(self.ids), generator=self.gen), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.ids) // 2:
            served = self.order[: self.pos]
            self.ids[served] = fresh = torch.arange(self.next, self.next + len(served))
            self.pool[served.to(self.pool.device)] = self.rows(fresh)
            self.next += len(served)
            self.reshuffle()
        rows = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.pool[rows.to(self.pool.device)]


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def geometric_median(x, iters=20):
    """Weiszfeld's iterations from the mean: a robust centre for b_pre (Gao et al.)."""
    m = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=1e-8)
        m = (w[:, None] * x).sum(dim=0) / w.sum()
    return m


def normalized_mse(x_hat, x):
    """MSE over the MSE of predicting the batch mean: a batch FVU, comparable across layers and
    models."""
    return (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean(dim=0)).pow(2).sum(-1).mean()


def sae_loss(sae, x, dead, k_aux, aux_coef):
    """Reconstruction FVU plus aux_coef * AuxK: the top k_aux dead latents' pre-activations
    reconstruct the residual error, which gives dead latents a gradient towards what the live ones
    miss."""
    pre = sae.encode_pre(x)
    values, indices = sae.topk(pre)
    x_hat = sae.decode_sparse(values, indices)
    fvu = normalized_mse(x_hat, x)
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if aux_coef > 0 and n_dead > 0:
        # AuxK trains the dead latents only; the main path is not pushed by it
        e = x - x_hat.detach()
        aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(
            min(k_aux, n_dead), dim=-1
        )
        e_hat = sae.decode_latents(F.relu(aux_values), aux_indices)
        aux = normalized_mse(e_hat, e).nan_to_num(0.0)
    return fvu + aux_coef * aux, fvu.detach(), aux.detach(), values.detach(), indices


def sae_lr(step, steps, lr):
    """Constant, then linear to 0 over the last 20% of steps: the end of training averages out
    noise."""
    return lr * min(1.0, (steps - step) / (0.2 * steps))


def train_sae(
    sae,
    batches,
    steps,
    lr,
    dead_tokens,
    k_aux=None,
    aux_coef=1 / 32,
    log=None,
    progress=True,
    log_interval=10,
    state=None,
    checkpoint=None,
    ckpt_interval=0,
):
    """Adam on standardised activation minibatches `batches` (an iterator of (N, d)); returns the
    last logged step's metrics. `log(dict)` is called every log_interval steps. Dead = no activation
    in the last dead_tokens tokens. `checkpoint(state)` gets all the loop carries over every
    ckpt_interval steps, at the end and on SIGINT/SIGTERM, which stop training after that step
    (metrics say "stopped"); `state` resumes one."""
    k_aux = k_aux or sae.d // 2
    # Gao et al.'s eps
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=sae.pre_bias.device)
    start, tokens, m, t0 = 0, 0, None, time.time()
    if state is not None:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired.copy_(state["since_fired"])
        # unused by the loop today; kept so that adding noise stays exact
        torch.set_rng_state(state["torch_rng"])
        start, tokens, m = state["step"], state["tokens"], state["metrics"]
    # signals only set a flag: the step in progress finishes, so the saved state is a consistent one
    stop = []
    handlers = (
        {s: signal.signal(s, lambda *_: stop.append(1)) for s in (signal.SIGINT, signal.SIGTERM)}
        if checkpoint
        else {}
    )
    bar = progress_bar(
        range(start, steps), initial=start, total=steps, disable=not progress, desc="sae"
    )
    try:
        for step in bar:
            x = next(batches)
            for group in opt.param_groups:
                group["lr"] = sae_lr(step, steps, lr)
            dead = since_fired >= dead_tokens
            loss, fvu, aux, values, indices = sae_loss(sae, x, dead, k_aux, aux_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.project_decoder_grad()
            opt.step()
            sae.normalise_decoder()
            since_fired += len(x)
            since_fired[indices[values > 0]] = 0
            tokens += len(x)
            if step % log_interval == 0 or step == steps - 1:
                m = {
                    "step": step,
                    "tokens": tokens,
                    "fvu": fvu.item(),
                    "auxk": aux.item(),
                    "l0": (values > 0).sum(-1).float().mean().item(),
                    "dead": dead.float().mean().item(),
                    "lr": sae_lr(step, steps, lr),
                    "time": round(time.time() - t0, 2),
                }
                bar.set_postfix(fvu=f"{m['fvu']:.4f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead']:.3f}")
                if log:
                    log(m)
            if checkpoint and (
                stop or step + 1 == steps or ckpt_interval and (step + 1) % ckpt_interval == 0
            ):
                checkpoint(
                    {
                        "step": step + 1,
                        "tokens": tokens,
                        "metrics": m,
                        "sae": sae.state_dict(),
                        "opt": opt.state_dict(),
                        "since_fired": since_fired,
                        "torch_rng": torch.get_rng_state(),
                    }
                )
            if stop:
                return {**m, "stopped": step + 1}
    finally:
        bar.close()  # a stopped run's last line too
        for s, h in handlers.items():
            signal.signal(s, h)
    return m


# -----------------------------------------------------------------------------
# Evaluation (the concept dictionary, what each latent fires on, is dictionary.py)


def summed_ce(model, h, layer, targets):
    """Summed next-token cross-entropy of the host finishing its pass from h after block `layer`."""
    logits = model.lm_head(model.forward_from(h, layer)).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, reduction="sum").item()


@torch.no_grad()
def evaluate_sae(
    sae, model, layer, data_dir, tokens=65536, batch_size=8, block_size=None, device="cpu"
):
    """On held-out windows: FVU, L0, dead fraction (never fired in these tokens) and the host's
    next-token loss with its hidden state after `layer` replaced by the SAE's reconstruction
    (delta_ce, nats)."""
    data, T = load_tokens(data_dir, "val"), block_size or model.config.block_size
    n = err = sq = l0 = ce = ce_sae = 0.0
    s1 = torch.zeros(sae.d, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for _, idx in val_windows(data, T, tokens, batch_size):
        idx = idx.to(device)
        inp, tgt = idx[:, :-1], idx[:, 1:].reshape(-1)
        h = model.forward_to(inp, layer).float()
        x, mu, std = sae.standardise(h)
        values, indices = sae.topk(sae.encode_pre(x))
        x_hat = sae.decode_sparse(values, indices)
        n += x.numel() // sae.d
        err += (x_hat - x).double().pow(2).sum().item()
        sq += x.double().pow(2).sum().item()
        s1 += x.double().sum(dim=(0, 1))
        l0 += (values > 0).sum().item()
        fired[indices[values > 0]] = True
        ce += summed_ce(model, h, layer, tgt)
        ce_sae += summed_ce(model, x_hat * std + mu, layer, tgt)
    fvu = err / (sq - s1.pow(2).sum().item() / n)  # sum (x - mean x)^2 = sum x^2 - n |mean x|^2
    return {
        "fvu": fvu,
        "l0": l0 / n,
        "dead": 1.0 - fired.float().mean().item(),
        "ce": ce / n,
        "ce_sae": ce_sae / n,
        "delta_ce": (ce_sae - ce) / n,
        "tokens": int(n),
    }
