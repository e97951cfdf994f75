"""MoE layer throughput: our ``MoeMlp`` vs DeepSpeed's ``deepspeed.moe.layer.MoE`` (same experts)
vs a dense MLP of the same active parameters, forward + backward, one run, same inputs.

    ./run bench moe_layer [--dim 768] [--hidden 3072] [--experts 8] [--tokens 3152]
                          [--steps 15] [--warmup 2] [--capacity-factor 1.0] [--threads N]
                          [--profile] [--smoke]

(``./run bench NAME`` runs bench/NAME.py with the venv; ``.venv/bin/python bench/moe_layer.py``
works too.) Defaults are a LiMoE-B/16 MLP: D=768, H=3072, E=8 experts, top-1, capacity factor 1.0,
3152 tokens per call (16 images x 197 tokens), fp32. On a 2-core CPU the whole run takes about
1 minute; smaller sizes (e.g. ``--dim 256 --hidden 1024``) take about 10 s.

Systems (one process; CUDA if available, else CPU with a 1-process gloo group, which DeepSpeed's MoE
needs to exist):
- ours: ``pretrain.models.moe.MoeMlp(D, H, E, top_k=1, capacity_factor=cf)``, router noise off;
- DeepSpeed: ``MoE(D, expert=Sequential(Linear(D, H), GELU(), Linear(H, D)), num_experts=E,
  ep_size=1, k=1, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0,
  noisy_gate_policy=None, drop_tokens=True, use_rts=False)``, with our router weight copied into its
  gate ``wg`` and our stacked expert weights (w1, b1, w2, b2, biases made non-zero first) copied
  into its E experts; min_capacity=0 because ours has no minimum (C = ceil(cf * T / E) in both);
- dense: ``Sequential(Linear(D, H), GELU(), Linear(H, D))`` over all T tokens: the parameters one
  token activates in a top-1 MoE (one expert), so the same expert FLOPs as the MoE layers at cf=1.

Check before timing: with a capacity factor of E (every expert has T slots, nothing is dropped) both
MoE layers must give the same output, input gradient and expert-weight gradients (allclose), which
proves they hold the same router and experts; at the timed capacity factor both must drop the same
number of tokens (each expert keeps min(load, C)), so they do the same expert work.

Measured: tokens/s = T / median wall time of one training-mode forward + backward (the output
back-propagated against a fixed random cotangent, i.e. loss = <out, G>; the input requires grad, as
a block's hidden state does; gradients set to None between iterations, outside the timing). Each
round times every system once, the order rotated by one every round so that no system always runs
right after another or first on a warm cache; the first ``--warmup`` rounds are not counted.
Run it on a quiet machine (the header prints the load average): with 2 threads on 2 shared cores,
another busy process stalls every matmul unevenly and the medians then say more about the
neighbours than about the layers (min/max show the spread).
Auxiliary losses are not part of the loss for any system (DeepSpeed's gate computes its ``l_aux``
inside the forward anyway; ours returns the router probabilities for the loss module to use).

Differences left on purpose (what each system is):
- which tokens an overflowing expert keeps: ours Batch Priority Routing (highest gate first);
  DeepSpeed without random token selection keeps whichever ``topk`` over its 0/1 token mask
  returns (no priority). Same count kept, so the same FLOPs.
- dispatch: ours sorts by priority, finds slots with a (T, E) one-hot cumsum, then index_copy into
  a (E*C, D) buffer and gather + index_add back. DeepSpeed 0.19.8's MOELayer also dispatches
  sparsely (its gate builds (T, E) one-hot masks and a top-C over tokens per expert, then
  ``index_select`` into (E, C, D) and back); the GShard dense one-hot (T, E, C) einsum dispatch is
  gone from this version's MOELayer path.
- experts: ours two batched matmuls (bmm) over stacked (E, D, H)/(E, H, D) weights; DeepSpeed
  loops over E ``nn.Sequential`` experts, one Linear-GELU-Linear each on its (C, D) block.

Output: a table (system, tokens/s, median/min/max ms per forward+backward, parameters total and
active per token), then as the last line ``ratio_vs_deepspeed_moe: X ratio_vs_dense: Y`` with
X = ours / DeepSpeed tokens/s and Y = ours / dense tokens/s.
Targets: X >= 1.0 (as fast as DeepSpeed's layer with the same experts), Y >= 0.7 (routing,
dispatch and combine cost at most ~30% on top of the expert FLOPs a dense MLP also pays).
``--profile`` then prints torch.profiler's top operators of our layer's forward + backward.

``--smoke``: the same run at tiny sizes, to check that the script works, not to measure (about 10 s
on 2 cores, nearly all of it importing torch, timm and DeepSpeed): D=32, H=64, E=4, T=64 (C=16),
1 warm-up and 1 timed round. All three systems run, DeepSpeed included (it is installed in the
project's venv), and so does the check that both MoE layers compute the same function. Flags given
beside ``--smoke`` still apply.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import smoke
from pretrain.engine import init_distributed
from pretrain.models.moe import MoeMlp

# --smoke: every system and the check still run; T = 16 x E leaves 16 slots per expert at cf=1, so
# some tokens are dropped and the dropped-count check compares something.
SMOKE = {"dim": 32, "hidden": 64, "experts": 4, "tokens": 64, "steps": 1, "warmup": 1}

# A forward + backward of one system on (x, cotangent); returns nothing, leaves grads behind.
Step = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class System:
    name: str
    module: nn.Module
    step: Step
    params: int  # all parameters of the layer
    active: int  # parameters one token's forward touches
    seconds: list[float] = field(default_factory=list)  # timed rounds only


def expert_mlp(dim: int, hidden: int) -> nn.Sequential:
    """One expert as DeepSpeed expects it, and the dense baseline: Linear-GELU-Linear."""
    # nn.GELU() is the exact (erf) GELU, as F.gelu's default in MoeMlp.
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def build_deepspeed_moe(ours: MoeMlp, dim: int, hidden: int, capacity_factor: float) -> nn.Module:
    """DeepSpeed's MoE layer with our layer's router and experts copied in."""
    from deepspeed.moe.layer import MoE  # after init_distributed: DeepSpeed's comm must be up

    theirs = MoE(hidden_size=dim, expert=expert_mlp(dim, hidden), num_experts=ours.num_experts, ep_size=1, k=1,
                 capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=0,
                 noisy_gate_policy=None, drop_tokens=True, use_rts=False)
    # What DeepSpeed's engine does at initialize(): give the layer its (here 1-rank) expert group.
    theirs.set_deepspeed_parallelism()
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)  # (E, D) both
        for e, expert in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
            expert[0].weight.copy_(ours.w1[e].T)  # nn.Linear stores (out, in): (H, D)
            expert[0].bias.copy_(ours.b1[e])
            expert[2].weight.copy_(ours.w2[e].T)  # (D, H)
            expert[2].bias.copy_(ours.b2[e])
    return theirs


def set_capacity_factor(ours: MoeMlp, theirs: nn.Module, capacity_factor: float) -> None:
    ours.capacity_factor = capacity_factor
    gate = theirs.deepspeed_moe.gate
    gate.capacity_factor = gate.eval_capacity_factor = capacity_factor


def run_ours(layer: MoeMlp) -> Step:
    def step(x: torch.Tensor, cotangent: torch.Tensor) -> None:
        out, _stats = layer(x)  # (T, D)
        out.backward(cotangent)
    return step


def run_deepspeed(layer: nn.Module) -> Step:
    def step(x: torch.Tensor, cotangent: torch.Tensor) -> None:
        out, _l_aux, _counts = layer(x)  # (T, D)
        out.backward(cotangent)
    return step


def run_dense(layer: nn.Module) -> Step:
    def step(x: torch.Tensor, cotangent: torch.Tensor) -> None:
        layer(x).backward(cotangent)  # (T, D)
    return step


def zero_grads(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def check_same_experts(ours: MoeMlp, theirs: nn.Module, x: torch.Tensor, cotangent: torch.Tensor,
                       capacity_factor: float) -> tuple[int, int]:
    """Assert both MoE layers compute the same function when no token overflows; return how many
    tokens each drops at ``capacity_factor`` (asserted equal)."""
    set_capacity_factor(ours, theirs, float(ours.num_experts))  # C = T: nothing can be dropped
    grads = []
    outs = []
    for module, step_out in ((ours, lambda: ours(x)[0]), (theirs, lambda: theirs(x)[0])):
        zero_grads(module, x)
        out = step_out()  # (T, D)
        out.backward(cotangent)
        outs.append(out.detach())
        grads.append(x.grad.clone())
    # fp32 sums of D and H terms in different orders (bmm vs per-expert Linear): ~1e-6 relative.
    tol = dict(rtol=1e-4, atol=1e-5)
    assert torch.allclose(outs[0], outs[1], **tol), f"outputs differ by {(outs[0] - outs[1]).abs().max():.3g}"
    assert torch.allclose(grads[0], grads[1], **tol), f"input grads differ by {(grads[0] - grads[1]).abs().max():.3g}"
    for e, expert in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):
        assert torch.allclose(ours.w1.grad[e].T, expert[0].weight.grad, **tol), f"expert {e} w1 grads differ"
        assert torch.allclose(ours.w2.grad[e].T, expert[2].weight.grad, **tol), f"expert {e} w2 grads differ"
    zero_grads(ours, x)
    zero_grads(theirs, x)

    set_capacity_factor(ours, theirs, capacity_factor)
    with torch.no_grad():
        dropped = [int((ours(x)[0] == 0).all(dim=-1).sum()), int((theirs(x)[0] == 0).all(dim=-1).sum())]
    assert dropped[0] == dropped[1], f"dropped tokens differ: ours {dropped[0]}, DeepSpeed {dropped[1]}"
    return dropped[0], dropped[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_systems(systems: list[System], x: torch.Tensor, cotangent: torch.Tensor, rounds: int, warmup: int) -> None:
    """Every round times each system once; the order rotates so that drift and cache effects
    fall on every system alike."""
    for r in range(rounds):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            zero_grads(s.module, x)
            sync(x.device)
            t0 = time.perf_counter()
            s.step(x, cotangent)
            sync(x.device)
            if r >= warmup:
                s.seconds.append(time.perf_counter() - t0)


def profile_ours(step: Step, module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> None:
    """Top operators (self time) of our layer's forward + backward, 3 iterations."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            zero_grads(module, x)
            step(x, cotangent)
        sync(x.device)
    sort = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    print("\nprofile of ours (3 x forward + backward):")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=768, help="model width D")
    p.add_argument("--hidden", type=int, default=3072, help="expert MLP width H")
    p.add_argument("--experts", type=int, default=8, help="E")
    p.add_argument("--tokens", type=int, default=16 * 197, help="T per call (default: 16 images x 197)")
    p.add_argument("--steps", type=int, default=15, help="timed rounds (each times every system once)")
    p.add_argument("--warmup", type=int, default=2, help="rounds before them, not timed")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="then print torch.profiler's table of ours")
    a = smoke.parse_args(p, SMOKE, "seconds, checks the script works: D=32 H=64 E=4 T=64, 1 round, all three "
                                   "systems and the check; see the docstring")
    if a.steps < 1 or a.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = init_distributed().device  # 1-process group (gloo on CPU, no shm op build; NCCL on CUDA)
    torch.manual_seed(a.seed)
    D, H, E, T = a.dim, a.hidden, a.experts, a.tokens
    ours = MoeMlp(D, H, E, top_k=1, capacity_factor=a.capacity_factor, router_noise_std=0.0)
    with torch.no_grad():  # zero biases (the init) would let a mis-copied bias pass the check
        ours.b1.uniform_(-(D**-0.5), D**-0.5)
        ours.b2.uniform_(-(H**-0.5), H**-0.5)
    theirs = build_deepspeed_moe(ours, D, H, a.capacity_factor)
    dense = expert_mlp(D, H)
    for m in (ours, theirs, dense):
        m.to(device).train()
    x = torch.randn(T, D, device=device, requires_grad=True)  # (T, D)
    cotangent = torch.randn(T, D, device=device)  # (T, D): loss = <out, cotangent>

    dropped, _ = check_same_experts(ours, theirs, x, cotangent, a.capacity_factor)
    capacity = math.ceil(a.capacity_factor * T / E)
    expert_size = n_params(dense)
    systems = [
        System("ours (MoeMlp, BPR)", ours, run_ours(ours), n_params(ours), D * E + expert_size),
        System("DeepSpeed MoE", theirs, run_deepspeed(theirs), n_params(theirs), D * E + expert_size),
        System("dense MLP", dense, run_dense(dense), expert_size, expert_size),
    ]
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__} | {device.type} ({threads}), fp32 "
          f"| D={D} H={H} E={E} top-1 cf={a.capacity_factor:g} T={T} tokens (C={capacity} slots/expert) | "
          f"{a.steps} timed rounds after {a.warmup} warm-up | load average before: {os.getloadavg()[0]:.2f}")
    print(f"check passed: same output and gradients with no overflow (cf={E}); at cf={a.capacity_factor:g} both "
          f"drop {dropped}/{T} tokens ({dropped / T:.1%})", flush=True)

    time_systems(systems, x, cotangent, a.warmup + a.steps, a.warmup)

    print(f"\n{'system':<20} {'tokens/s':>10} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'params':>11} "
          f"{'active/token':>13}")
    rate = {}
    for s in systems:
        med = statistics.median(s.seconds)
        rate[s.name] = T / med
        print(f"{s.name:<20} {T / med:>10.0f} {med * 1e3:>10.1f} {min(s.seconds) * 1e3:>8.1f} "
              f"{max(s.seconds) * 1e3:>8.1f} {s.params:>11,} {s.active:>13,}")
    ours_rate, ds_rate, dense_rate = (rate[s.name] for s in systems)
    if a.profile:
        profile_ours(systems[0].step, ours, x, cotangent)
    print(f"ratio_vs_deepspeed_moe: {ours_rate / ds_rate:.2f} ratio_vs_dense: {ours_rate / dense_rate:.2f}")


if __name__ == "__main__":
    main()
