"""
Three operations, each the exact value of a plain PyTorch expression (the `*_reference` functions
written next to them, which the tests compare against), computed without that expression's large
intermediate:

- sparse top-k mixing (the CoCoMix student's compression and the SAE's decoder):
  sparse_mix = sparse_mix_reference, without the dense N x C masked matrix;
- the LM head's next-token cross-entropy (and KD's KL to a teacher's head):
  lm_loss = lm_loss_reference, without the N x V logits;
- the student's concept head in training: the concept logits z = x W^T + b, their TopK and the
  concept loss (the cross-entropy of z at the K_attr labels, concept_loss_reference) in one op,
  fused_concept_head, without keeping z and without an N x C tensor in the backward. Its plain
  expression is model.ConceptMixer.predict's other path: F.linear, torch.topk,
  concept_loss_reference.

Read the references first: they are what the model means; the rest is how it is made fast.

A fourth, causal_attention, is the same function as PyTorch's fused attention (its reference) made
with three batched matmuls where that is faster: training in bf16 on a CPU.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def sparse_mix_reference(values, indices, W):
    """The dense masked product: the K values of each row scattered into zero N x C, times W."""
    dense = torch.zeros(*values.shape[:-1], W.size(0), dtype=values.dtype, device=values.device)
    return dense.scatter_add(-1, indices, values) @ W


def sparse_mix_backward_reference(grad_out, values, indices, W):
    """sparse_mix's gradients, plainly: grad_values[n, k] = g[n] . W[indices[n, k]] and grad_W[c] =
    sum of values[n, k] g[n] over the (n, k) with indices[n, k] = c (an index_add_)."""
    N, K = indices.shape
    grad_values = (W[indices] * grad_out[:, None, :]).sum(-1)
    rows = (values[:, :, None] * grad_out[:, None, :]).reshape(N * K, -1)
    return grad_values, torch.zeros_like(W).index_add_(0, indices.reshape(-1), rows)


def sparse_mix(values, indices, W):
    """(..., K) values and indices into the rows of W (C x d) -> (..., d), equal to
    sparse_mix_reference without its N x C matrix: embedding_bag is a fused gather + weighted sum of
    the K rows (no N x K x d intermediate either), and its own backward gives both gradients of
    sparse_mix_backward_reference (a dot product per chosen row for the values, a scatter-add into
    the chosen rows of W)."""
    shape, K = values.shape[:-1], values.size(-1)
    out = F.embedding_bag(
        indices.reshape(-1, K), W, per_sample_weights=values.reshape(-1, K), mode="sum"
    )
    return out.view(*shape, W.size(1))


def sparse_mix_t(values, indices, x, n_rows):
    """sparse_mix's transpose: sparse_mix(values, indices, W) is S W for the N x n_rows matrix S
    that holds the values at the indices, and this is S^T x (n_rows x d),
    sparse_mix_backward_reference's grad_W with x for grad_out: row c sums values[n, k] x[n] over
    the (n, k) with indices[n, k] = c. One embedding_bag over the (n, k) sorted by index, a bag per
    row: no N*K x d intermediate."""
    flat = indices.reshape(-1)
    order = flat.argsort()
    # where row c's bag starts
    offsets = torch.searchsorted(flat[order], torch.arange(n_rows, device=x.device))
    rows = order // indices.size(-1)  # the n of each sorted (n, k)
    return F.embedding_bag(
        rows, x, offsets, per_sample_weights=values.reshape(-1)[order].to(x.dtype), mode="sum"
    )


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(hd) + causal mask) v for (B, H, T, hd) queries, keys and values:
    PyTorch's fused kernel (F.scaled_dot_product_attention, is_causal=True), except when training in
    bf16 on a CPU at T <= 512, where that kernel's backward takes twice as long as the plain
    product's (docs/benchmarks.md). There the scores and the mask come from one baddbmm, then their
    softmax times v. The softmax it keeps for the backward is B x H x T x T, where the kernel keeps
    one number a row: hence the bound on T."""
    plain = q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
    if not plain or dropout_p or q.size(2) > 512:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    B, H, T, hd = q.shape
    q, k, v = (t.reshape(B * H, T, hd) for t in (q, k, v))
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(mask.expand(B * H, T, T), q, k.transpose(1, 2), alpha=hd**-0.5)
    return torch.bmm(scores.softmax(-1), v).view(B, H, T, hd)


def precisions(x):
    """(matmul precision, sum precision) of an op on x: autocast's dtype where autocast is on, else
    x's; sums in at least fp32. The ops below turn autocast off inside (autocast_off) and cast by
    these themselves. Any device: one without autocast (meta) computes in x's dtype."""
    dev = x.device.type
    on = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    cdt = torch.get_autocast_dtype(dev) if on else x.dtype
    return cdt, torch.promote_types(cdt, torch.float32)


def autocast_off(device_type):
    """Autocast turned off on device_type; nothing to turn off on a device without it (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def logp_at(z, t):
    """log softmax(z) at t, in fp32, for fp16 logits z (N x V) and indices t (N x K): N x K.

    fp16's softmax cannot give the loss -log p_t: below its smallest normal, 6.1e-5 (9.70 nats;
    every row of GPT-2's 50,257 tokens at initialisation), p_t loses precision and below 6e-8 it is
    0; near 1 its spacing, 2^-11, is a large part of a confident row's small loss. PyTorch's
    log-softmax reads the fp16 logits and writes fp32 in one kernel: exact, for one more pass over
    them, made in blocks of rows whose fp32 output is at most 64 MiB. Through p itself (its largest
    entry and the fp32 sum of the others) would save that pass, but a confident row's many small p_j
    are fp16 subnormals, rounded by up to a few percent each: not exact."""
    rows = max(1, 2**24 // z.size(-1))
    return torch.cat(
        [
            F.log_softmax(z[s : s + rows], -1, dtype=torch.float32).gather(-1, t[s : s + rows])
            for s in range(0, z.size(0), rows)
        ]
    )


class LMHeadLoss(torch.autograd.Function):
    """Mean next-token cross-entropy of the logits x W^T (x: N x d, W: V x d, targets: N, -1 =
    ignore) in the fewest passes over the N x V logits. The forward makes them in one matmul, in the
    compute precision (bf16 under autocast), and turns them in place, a chunk of rows at a time,
    into the logit gradient softmax - onehot; the backward is two more large matmuls, grad_x = G W
    and grad_W = G^T x. Only N-sized things are scaled: ignored rows are masked in x and in grad_x,
    and the 1/n of the mean is applied after the matmuls, in fp32, so that fp16 does not flush the
    gradient to zero. Nothing else of size N x V is stored.

    The softmax runs in the compute precision (PyTorch's kernel sums in fp32 and rounds its output
    once, as storing an fp32 softmax in bf16 would). The loss is -log p_target from it, within
    bf16's rounding of p (<= 0.004 nats per row, unbiased); in fp16, whose p_t underflows, from an
    fp32 log-softmax at the target (logp_at). Evaluation (no autograd) is exact.

    With a frozen teacher (teacher_x: N x d_t, teacher_W: V x d_t) the loss is KD's
    CE + lam_kd * KL(p_teacher || p_student), whose gradient in the student's logits is
    (1 + lam_kd) p_student - onehot - lam_kd p_teacher, made in fp32 a chunk at a time, with the
    teacher's logits. Returns (loss, CE, KL); only the loss has a gradient."""

    @staticmethod
    def forward(ctx, x, W, targets, chunk, teacher_x=None, teacher_W=None, lam_kd=0.0):
        dev = x.device.type
        cdt, acc = precisions(x)
        with autocast_off(dev):
            xc, V = x.to(cdt), W.size(0)
            # the vocabulary padded with zero rows to a multiple of 64, as nanoGPT pads its own: the
            # CPU GEMMs are 5-20% faster there (docs/benchmarks.md). The padded logits are set to
            # -inf, so they take no probability and get no gradient
            Wc = W.new_empty(V + -V % 64, W.size(1), dtype=cdt)
            Wc[:V], Wc[V:] = W, 0.0
            G = xc @ Wc.t()  # the logits, becoming the logit gradient chunk by chunk below
            G[:, V:] = float("-inf")
            valid = targets >= 0
            n = valid.sum().clamp(min=1)
            ce, kl = (
                torch.zeros((), dtype=acc, device=x.device),
                torch.zeros((), dtype=acc, device=x.device),
            )
            for s in range(0, x.size(0), chunk):
                logits, t, v = (
                    G[s : s + chunk],
                    targets[s : s + chunk].clamp(min=0),
                    valid[s : s + chunk],
                )
                rows = torch.arange(len(t), device=x.device)
                target_logit = logits[rows, t].to(acc)
                if teacher_x is None:
                    # fp16: log p_t in fp32 from the logits, before they become p (logp_at)
                    if cdt == torch.float16:
                        logp_t = logp_at(logits, t[:, None]).squeeze(-1)
                    # softmax in place: the chunk's logits become p without a second chunk-sized
                    # buffer and a copy back (~3x faster on a CPU, docs/benchmarks.md)
                    p = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
                    if cdt != torch.float16:
                        # in bf16 and fp32 p_t below the smallest normal number (1e-38) would make
                        # log p_t infinite, and only a row more than ~87 nats wrong gets there: it
                        # counts as 87
                        logp_t = p[rows, t].to(acc).clamp(min=torch.finfo(cdt).tiny).log()
                    lse = target_logit - logp_t  # log-sum-exp = x_t - log p_t
                else:
                    logits, padded = logits[:, :V], logits[:, V:]
                    padded.zero_()  # their gradient
                    logp = torch.log_softmax(logits, dim=-1, dtype=acc)
                    logq = torch.log_softmax(
                        teacher_x[s : s + chunk].to(cdt) @ teacher_W.to(cdt).t(), dim=-1, dtype=acc
                    )
                    q = logq.exp()
                    kl += ((q * (logq - logp)).sum(-1) * v).sum()
                    lse = target_logit - logp[rows, t]
                    p = logp.exp_().mul_(1 + lam_kd).sub_(q.mul_(lam_kd))
                ce += ((lse - target_logit) * v).sum()
                p[rows, t] -= 1.0
                if p is not logits:  # KD's gradient was made in a buffer of its own
                    logits.copy_(p)
        ctx.save_for_backward(
            G, xc * valid[:, None].to(cdt) if ctx.needs_input_grad[1] else None, Wc, valid, n
        )
        ctx.dtypes, ctx.V = (x.dtype, W.dtype), V
        ce, kl = ce / n, kl / n
        ctx.mark_non_differentiable(ce, kl)
        return ce + lam_kd * kl, ce, kl

    @staticmethod
    def backward(ctx, g, _ce, _kl):
        G, x_valid, Wc, valid, n = ctx.saved_tensors
        acc = torch.promote_types(G.dtype, torch.float32)
        scale = g.to(acc) / n  # in fp32 (at least), after the matmuls
        with autocast_off(G.device.type):
            # ignored rows: 0
            grad_x = ((G @ Wc).to(acc) * (valid[:, None] * scale)).to(ctx.dtypes[0])
            # a frozen head (the concept labeler's source) needs no weight gradient
            grad_W = None
            if x_valid is not None:  # the padded rows dropped
                if G.dtype == torch.bfloat16:  # the CPU's bf16 GEMM: x^T G ~15% faster than G^T x
                    gW = (x_valid.t().contiguous() @ G)[:, : ctx.V].t()
                else:  # in fp32 G^T x is ~20% faster
                    gW = (G.t() @ x_valid)[: ctx.V]
                # in W's layout, fp32 at least (a copy only where the layout or dtype differs)
                gW = gW.to(acc, memory_format=torch.contiguous_format)
                grad_W = gW.mul_(scale).to(ctx.dtypes[1])
        return grad_x, grad_W, None, None, None, None, None


# the device type whose chunk sizes lm_loss takes on every device; None: the tensors' own. A CPU
# trace of a GPU's step sets "cuda" (cocomix/memory.py, as_on_cuda)
chunk_device = None


def default_lm_chunk(device):
    """Rows per LM-head chunk: 4096 on a GPU, 1024 elsewhere (see lm_loss)."""
    return 4096 if (chunk_device or torch.device(device).type) == "cuda" else 1024


def lm_loss(x, W, targets, chunk=None, teacher=None, lam_kd=0.1):
    """Next-token cross-entropy of the LM head (see LMHeadLoss). With
    teacher = (teacher_x, teacher_W): (CE + lam_kd * KL, CE, KL), KD's loss and its two terms.
    Without autograd (evaluation) the chunks are simply summed. chunk: rows per softmax chunk; by
    default 1024 on CPU (measured fastest of 256, 1024 and 4096 on a 2-core AVX512-BF16 CPU, see
    docs/benchmarks.md) and 4096 on a GPU (few chunks for torch.compile, which unrolls the loop)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    tx, tW = (
        (teacher[0].reshape(-1, teacher[0].size(-1)), teacher[1])
        if teacher is not None
        else (None, None)
    )
    chunk = chunk or default_lm_chunk(x.device)
    if torch.is_grad_enabled() and (x.requires_grad or W.requires_grad):
        out = LMHeadLoss.apply(x, W, targets, chunk, tx, tW, lam_kd)
        return out[0] if teacher is None else out
    n = (targets >= 0).sum().clamp(min=1)
    ce = kl = 0.0
    # softmax and sums: at least fp32
    acc = lambda a: a.to(torch.promote_types(a.dtype, torch.float32))
    for s in range(0, x.size(0), chunk):
        logits, t = acc(x[s : s + chunk] @ W.t()), targets[s : s + chunk]
        ce = ce + F.cross_entropy(logits, t, ignore_index=-1, reduction="sum")
        if teacher is not None:
            kl = kl + kl_rows(logits, acc(tx[s : s + chunk] @ tW.t()), t >= 0).sum()
    return ce / n if teacher is None else ((ce + lam_kd * kl) / n, ce / n, kl / n)


def lm_loss_reference(x, W, targets, teacher=None, lam_kd=0.1):
    """What lm_loss computes, from the full N x V logits: cross-entropy (ignoring targets of -1)
    and, with a teacher (teacher_x, teacher_W), (CE + lam_kd * KL(p_teacher || p_student), CE, KL).
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # softmax and sums: at least fp32
    logits = (x @ W.t()).flatten(0, -2).to(acc)
    targets = targets.reshape(-1)
    ce = F.cross_entropy(logits, targets, ignore_index=-1)
    if teacher is None:
        return ce
    valid = (targets >= 0).to(acc)
    kl = kl_rows(
        logits, (teacher[0] @ teacher[1].t()).flatten(0, -2).to(acc), valid
    ).sum() / valid.sum().clamp(min=1)
    return ce + lam_kd * kl, ce, kl


def kl_rows(student_logits, teacher_logits, valid):
    """Per row KL(p_teacher || p_student), zero where not valid."""
    logq, logp = F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1) * valid


def concept_loss_reference(z, labels):
    """Mean cross-entropy of the concept logits z (..., C) at the K_attr labels (..., K_attr; -1 =
    no label): one log-softmax (in at least fp32) serves all K_attr labels of a token; invalid
    labels are ignored."""
    logp = F.log_softmax(z.flatten(0, -2).to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
    labels = labels.flatten(0, -2)
    valid = labels >= 0
    nll = -logp.gather(-1, labels.clamp(min=0)) * valid
    return nll.sum() / valid.sum().clamp(min=1)


class FusedConceptHead(torch.autograd.Function):
    """The student's concept head in training, in one op: from x (N x d), W (C x d), b (C) and the
    labels (N x K_attr, -1 = none), the values and indices of TopK_k(z) and L_concept =
    concept_loss_reference(z, labels) for the concept logits z = x W^T + b; the same as F.linear,
    torch.topk and concept_loss_reference (ConceptMixer.predict's plain path), without keeping z and
    without any N x C tensor in the backward.

    The forward keeps only z's softmax p, in z's precision (bf16 under autocast; PyTorch's kernel
    sums in fp32); the loss is -log p at the labels, within bf16's rounding of p (<= 0.004 nats per
    label, unbiased; in fp16 from an fp32 log-softmax at the labels, logp_at), and in fp32 the
    reference's to float precision. The gradient in z would be
        dz = s (cnt p - onehot(labels)) + TopK's gradient g_values at its indices
    (s = g / n, n: all valid labels, cnt: a row's valid labels). The backward never forms it: its
    dense part s diag(cnt) p reaches x and [W | b] through two matmuls, s cnt (p W) and
    s p^T [cnt x | cnt] (the bias is the weight of an input that is always 1), with s applied after
    them in fp32 as in LMHeadLoss; its sparse part, N x (K_attr + k) entries, through sparse_mix and
    sparse_mix_t. On a CPU this saves the N x C passes that autograd would make (scaling, zeros,
    additions, a transposing copy, the bias's sum; docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, W, b, k, labels):
        dev = x.device.type
        cdt, acc = precisions(x)
        with autocast_off(dev):
            Wc = W.to(cdt)
            z = torch.addmm(b.to(cdt), x.to(cdt), Wc.t())
            values, indices = torch.topk(z, k, dim=-1)
            p = torch.softmax(z, dim=-1)
        valid = labels >= 0
        n = valid.sum().clamp(min=1)
        if cdt == torch.float16:  # log p in fp32 from the logits (logp_at)
            logp_label = logp_at(z, labels.clamp(min=0))
        else:  # in bf16 and fp32 below the smallest normal (1e-38): 87 nats
            p_label = p.gather(-1, labels.clamp(min=0)).to(acc)
            logp_label = p_label.clamp(min=torch.finfo(p.dtype).tiny).log()
        loss = -(logp_label * valid).sum() / n
        ctx.save_for_backward(x, Wc, p, indices, labels, n)
        ctx.dtypes = x.dtype, W.dtype, b.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g_values, _, g):
        x, Wc, p, indices, labels, n = ctx.saved_tensors
        acc = torch.promote_types(p.dtype, torch.float32)
        s = g.to(acc) / n  # fp32: not rounded to p's dtype
        valid = labels >= 0
        cnt = valid.sum(-1, keepdim=True).to(acc)
        # [x | 1]: the bias is the weight of a 1
        x1 = torch.cat((x.to(acc), torch.ones_like(cnt)), 1)
        # dz's sparse part: -s at each valid label, g_values at the TopK's indices
        idx = torch.cat((labels.clamp(min=0), indices), 1)
        w = torch.cat((-s * valid, g_values.to(acc)), 1)
        with autocast_off(x.device.type):
            grad_x = (p @ Wc).to(acc) * (s * cnt) + sparse_mix(w, idx, Wc.to(acc))
            grad_Wb = sparse_mix_t(w, idx, x1, Wc.size(0)).add_(
                (p.t() @ (x1 * cnt).to(p.dtype)).to(acc) * s
            )
        return (
            grad_x.to(ctx.dtypes[0]),
            grad_Wb[:, :-1].to(ctx.dtypes[1]),
            grad_Wb[:, -1].to(ctx.dtypes[2]),
            None,
            None,
        )


def fused_concept_head(x, W, b, k, labels):
    """(values, indices, L_concept) of x (..., d) and labels (..., K_attr): FusedConceptHead."""
    values, indices, loss = FusedConceptHead.apply(
        x.reshape(-1, x.size(-1)), W, b, k, labels.reshape(-1, labels.size(-1))
    )
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k), loss
