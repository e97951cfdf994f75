"""Fused Triton kernels: the contrastive losses (the (rows x columns) logits live only in tiles)
and the MoE router.

- :mod:`pretrain.kernels.softmax_ce`: ``triton_cross_entropy``, the kernel twin of
  :func:`pretrain.losses.chunked.tiled_cross_entropy` (softmax CE in both directions);
- :mod:`pretrain.kernels.sigmoid`: ``triton_sigmoid_loss``, SigLIP's pairwise sigmoid loss;
- :mod:`pretrain.kernels.common`: the two tile kernels (a row reduction and a row gradient) that
  both losses launch, the CUDA check and the block sizes;
- :mod:`pretrain.kernels.router`: softmax, top-k, Batch Priority Routing slots and the auxiliary
  losses' per-group sums in one kernel, with its PyTorch reference (:func:`route_reference`).

Importing these modules imports triton (cheap: ~0.25 s). ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests), but
it must be set before triton is first imported in the process: triton reads it whenever a
function is ``@triton.jit``-decorated, triton.language's own helpers included, so one process
holds either compiled or interpreted kernels, never both.
"""
