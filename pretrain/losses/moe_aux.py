"""Auxiliary losses for MoE routers (V-MoE balancing, LIMoE per-modality entropy).

Each function takes the router probabilities ``probs`` (T, E) of one MoE layer (the load and global
entropy also the chosen experts (T, k)) and, for LIMoE's entropy losses, of one modality: call them once on the image tokens and once on the text tokens.
Every loss only needs per-expert and per-token sums, which the router already returns
(:class:`~pretrain.models.moe.RoutingStats`: probability mass per expert, summed token entropy,
assignment counts); the ``*_from_sums`` forms take those, and :class:`MoeAuxLoss` uses them, so
the loss never rereads the (T, E) probabilities. The ``probs`` forms compute the sums and call them.

Load loss: V-MoE's load loss estimates, through the router noise, the probability that each token
would still pick each expert; it needs the noise std and the k-th largest logit and is only
defined with noisy routing. We use the Switch Transformer load-balancing loss
E * sum_e f_e * P_e instead (f_e: fraction of assignments sent to expert e, no gradient; P_e:
mean router probability of e, differentiable). It is 1 when routing is uniform, larger when the
experts the router favours also receive most tokens, and needs no noise.

Global entropy: LIMoE takes the entropy of the modality's mean router distribution. While the
router is still nearly flat (the start of every run, and all of a short one) that entropy sits near
log E whatever the router decides: top-1 of near-equal probabilities is settled by a small offset
that all of a modality's tokens share, so every token can go to one expert while the mean
distribution stays uniform and the thresholded loss, hence its gradient, stays exactly zero
(measured on the demo LiMoE with both entropy weights at 0.1: 99% of the text tokens on one expert
while the mean distribution's entropy never fell below 1.06 nats > tau = 0.7). We threshold the entropy of where the tokens actually went, the
assignment shares f, and let the gradient flow through the mean probabilities P instead, the
construction of the Switch load loss (value from f, gradient from P): the loss is nonzero exactly
when a modality's routing has collapsed, and its gradient moves probability towards the experts
the modality leaves idle. Once the router is confident f and P agree and this is LIMoE's loss.

Across data-parallel ranks: local entropy, importance and load are per-token averages that each
rank can take over its own tokens. Global entropy is not: the entropy of the shares over the
global batch differs from the mean of per-rank entropies. Pass ``reduce_fn`` to sum the
statistics over ranks before the entropy is taken. It receives one (2E+1,) fp32 tensor,
``[probability mass per expert (E,), assignments per expert (E,), token count]``, and must return
its sum over ranks, e.g. :func:`~pretrain.losses.gather.all_reduce_sum_with_grad` (autograd-aware,
so the gradient reaches every rank's router; the plain ``dist.all_reduce`` would cut it), which
:class:`MoeAuxLoss` uses: one collective per MoE layer and modality.
"""
from __future__ import annotations

from typing import Callable

import torch

from pretrain.config import MoeConfig
from pretrain.losses.gather import all_reduce_sum_with_grad

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis; 0 log 0 = 0, so one-hot rows give exactly 0."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def importance_from_sums(mass: torch.Tensor) -> torch.Tensor:
    """Importance loss from the summed probability per expert, mass (E,) -> ()."""
    mass = mass.float()
    return (mass.std(unbiased=False) / mass.mean()) ** 2


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """V-MoE importance loss: squared coefficient of variation of per-expert summed probability.

    probs (T, E) -> (). Population std (ddof 0), as in V-MoE; 0 when every expert gets equal mass.
    """
    return importance_from_sums(probs.float().sum(dim=0))


def load_balancing_from_sums(mass: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Load loss from mass (E,) summed probabilities, counts (E,) top-k assignments, T -> ()."""
    f = counts.float() / counts.sum()  # (E,) no gradient: routing is discrete; sum = T * k
    p_mean = mass.float() / num_tokens  # (E,)
    return mass.shape[-1] * (f * p_mean).sum()


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch-style load loss E * sum_e f_e * P_e (see the module docstring for why not V-MoE's).

    probs (T, E), expert_index (T, k) chosen experts -> (). f_e counts every top-k assignment, so
    it sums to 1 for any k; capacity drops are ignored because they are the symptom to prevent.
    """
    counts = torch.bincount(expert_index.reshape(-1), minlength=probs.shape[-1])  # (E,)
    return load_balancing_from_sums(probs.float().sum(dim=0), counts, probs.shape[0])


def local_entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """LIMoE local entropy: mean over tokens of each token's routing entropy (T, E) -> ().

    Minimised, so each token commits to few experts.
    """
    return _entropy(probs.float()).mean()


def global_entropies_from_sums(mass: torch.Tensor, counts: torch.Tensor, num_tokens: int,
                               reduce_fn: ReduceFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One modality's global entropies (nats) from its sums over T tokens: mass (E,) summed
    probabilities, counts (E,) top-k assignments -> (assignment entropy (), router entropy ()).

    The assignment entropy has the value of the assignment shares' entropy and the gradient of the
    mean probabilities (see the module docstring); the router entropy is LIMoE's, of the mean
    probabilities, for the metrics. With ``reduce_fn`` both are over every rank's tokens.
    """
    E = mass.shape[-1]
    stats = torch.cat([mass.float(), counts.float(), mass.new_full((1,), num_tokens, dtype=torch.float32)])  # (2E+1,)
    if reduce_fn is not None:
        stats = reduce_fn(stats)  # (2E+1,)
    mean_probs = stats[:E] / stats[-1]  # (E,) differentiable
    assigned = stats[E : 2 * E].detach()  # (E,) routing is discrete: no gradient
    total = assigned.sum().clamp_min(1.0)  # ()
    shares = assigned / total  # (E,)
    through = shares + mean_probs - mean_probs.detach()  # (E,) value: shares; gradient: mean probabilities
    # d(-H)/d(share_e) = log(share_e) + 1; the +1 meets a gradient that sums to zero over experts,
    # and an idle expert's log is taken at the smallest share it could have (one assignment), so
    # the push towards it is strong but finite. The value is exact: 0 * log(...) = 0.
    floor = 1.0 / total
    assignment = -(through * torch.log(shares.clamp_min(floor))).sum()
    return assignment, _entropy(mean_probs.detach())


def global_entropy(probs: torch.Tensor, expert_index: torch.Tensor, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
    """Entropy of where one modality's tokens went, probs (T, E) and their top-k experts (T, k) -> ()
    in nats, with the gradient of the mean probabilities; with ``reduce_fn`` over every rank's tokens."""
    counts = torch.bincount(expert_index.reshape(-1), minlength=probs.shape[-1])  # (E,)
    return global_entropies_from_sums(probs.float().sum(dim=0), counts, probs.shape[0], reduce_fn)[0]


def router_entropy(probs: torch.Tensor, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
    """LIMoE's global entropy, of the mean routing distribution of one modality: (T, E) -> (), no gradient."""
    counts = torch.zeros(probs.shape[-1], dtype=torch.long, device=probs.device)
    return global_entropies_from_sums(probs.float().sum(dim=0), counts, probs.shape[0], reduce_fn)[1]


def global_entropy_loss(probs: torch.Tensor, expert_index: torch.Tensor, tau: float,
                        reduce_fn: ReduceFn | None = None) -> torch.Tensor:
    """LIMoE's global entropy loss max(0, tau - H), on the assignments (see :func:`global_entropy`).

    Keeps a modality spread over at least ~exp(tau) experts without forcing it over all of them:
    above the threshold the loss and its gradient are zero.
    """
    return torch.clamp(tau - global_entropy(probs, expert_index, reduce_fn), min=0.0)


class MoeAuxLoss(torch.nn.Module):
    """Weighted sum of the four router losses over every MoE layer and modality, plus ``moe/*``.

    Each loss is averaged over the (layer, modality) pairs, so a weight means the same thing for
    any depth. Metrics are detached tensors (converted to floats only when logged):
    ``moe/aux/<loss>`` and, per layer and modality, ``moe/layer<i>/<modality>/...``: this rank's
    fraction of assignments per expert (``load_e<j>``) and its entropy (``usage_entropy``), the
    local entropy, the global entropy of the assignments over every rank (what ``tau`` bounds), the
    entropy of the mean router probabilities (``router_entropy``, LIMoE's global quantity) and the
    dropped-token fraction.
    """

    def __init__(self, cfg: MoeConfig, reduce_fn: ReduceFn | None = all_reduce_sum_with_grad) -> None:
        super().__init__()
        self.cfg = cfg
        self.reduce_fn = reduce_fn

    def forward(self, routing: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """routing: modality -> RoutingStats per MoE layer -> (weighted loss (), metrics)."""
        c = self.cfg
        weights = {"importance": c.importance_weight, "load": c.load_weight,
                   "local_entropy": c.local_entropy_weight, "global_entropy": c.global_entropy_weight}
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
        metrics: dict[str, torch.Tensor] = {}
        for modality, layers in routing.items():
            for i, stats in enumerate(layers):
                # From the router's sums (the same values as the probs forms of the losses).
                local = stats.entropy_sum / stats.num_tokens
                glob, router = global_entropies_from_sums(stats.mass, stats.counts, stats.num_tokens, self.reduce_fn)
                terms["importance"].append(importance_from_sums(stats.mass))
                terms["load"].append(load_balancing_from_sums(stats.mass, stats.counts, stats.num_tokens))
                terms["local_entropy"].append(local)
                terms["global_entropy"].append(torch.clamp(c.tau - glob, min=0.0))
                prefix = f"moe/layer{i}/{modality}"
                metrics[f"{prefix}/local_entropy"] = local.detach()
                metrics[f"{prefix}/global_entropy"] = glob.detach()
                metrics[f"{prefix}/router_entropy"] = router
                metrics[f"{prefix}/dropped_frac"] = stats.dropped_frac
                # Entropy of where tokens actually went (argmax, not probabilities): the number
                # that shows a collapse onto one expert even while the router's softmax is flat.
                metrics[f"{prefix}/usage_entropy"] = _entropy(stats.load)
                for e, share in enumerate(stats.load.unbind()):
                    metrics[f"{prefix}/load_e{e}"] = share
        if not terms["load"]:  # no MoE layer ran
            return torch.zeros(()), metrics
        total = 0.0
        for name, values in terms.items():
            mean = torch.stack(values).mean()  # () over (layer, modality) pairs
            metrics[f"moe/aux/{name}"] = mean.detach()
            total = total + weights[name] * mean
        return total, metrics
