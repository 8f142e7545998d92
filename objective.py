"""
The student's training loss for every mode, composed from what GPT.hidden_states returns: the final
hidden states x (B x T x d) and, for CoCoMix, L_concept at the labels (and, without autograd, the
concept logits z (B x T x C) for the recall).

    ntp, pause   L = CE(next token)
    cocomix      L = CE(next token) + lam * L_concept        L_concept: CE of z at the K_attr labels
    kd           L = CE(next token) + lam_kd * KL(p_teacher || p_student)

The next-token loss comes from x in row chunks (ops.lm_loss), never holding the B x T x V logits;
KD makes the teacher's logits in the same chunks. train.py trains with Objective; bench.py times training_loss.
"""

import torch

from model import concept_recall
from ops import lm_loss


def training_loss(model, X, Y, mode, labels=None, teacher=None, lam=0.1, lam_kd=0.1, recall=False, head_loss=lm_loss):
    """(loss, parts) of one micro-batch: parts holds the detached terms ('ntp', 'concept' or 'kd') for the log,
    and with recall=True CoCoMix's concept recall@K_attr (a top-K_attr over C: at evaluation only, without
    autograd, when hidden_states returns z).
    labels: B x T x K_attr concept labels (cocomix); teacher: (final hidden state, head weight) of the
    KD teacher (GPT.as_teacher). head_loss: ops.lm_loss, or ops.lm_loss_reference (full logits) to compare."""
    x, z, concept = model.hidden_states(X, labels=labels if mode == 'cocomix' else None)  # concept: L_concept
    W = model.lm_head.weight
    if mode == 'kd':  # CE + lam_kd * KL, the teacher's logits made in the same row chunks
        loss, ntp, kd = head_loss(x, W, Y, teacher=teacher, lam_kd=lam_kd)
        return loss, {'ntp': ntp, 'kd': kd}
    ntp = head_loss(x, W, Y)
    if mode != 'cocomix':
        return ntp, {'ntp': ntp.detach()}
    loss = ntp + lam * concept  # the paper's objective
    parts = {'ntp': ntp.detach(), 'concept': concept.detach()}
    if recall:
        if z is None:
            raise ValueError("concept recall is measured without autograd (torch.no_grad), where hidden_states returns z")
        parts['recall'] = concept_recall(z, labels)
    return loss, parts


class Objective(torch.nn.Module):
    """training_loss as a module around the model: DDP wraps it (and torch.compile compiles it), so the
    whole loss is one forward. Recall is measured in eval mode only (2% of a CPU step)."""

    def __init__(self, model, mode, lam=0.1, lam_kd=0.1):
        super().__init__()
        self.model, self.mode, self.lam, self.lam_kd = model, mode, lam, lam_kd

    def forward(self, X, Y, labels=None, teacher=None):
        return training_loss(self.model, X, Y, self.mode, labels, teacher, self.lam, self.lam_kd, recall=not self.training)
