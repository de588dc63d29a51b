"""Efficient attention (chapter 12): each family of fixes to the quadratic cost of attention, from scratch.

* :mod:`tfcourse.efficient.flash`: FlashAttention in PyTorch, exact, tile by tile, with its own backward pass;
* :mod:`tfcourse.efficient.triton_flash`: the same forward pass as a Triton kernel (imported on demand: it needs
  the ``triton`` package);
* :mod:`tfcourse.efficient.sparse`: sliding-window, strided, fixed and block-sparse (Sparse Transformer),
  Longformer and BigBird masks, and banded sliding-window attention;
* :mod:`tfcourse.efficient.linear`: linear attention with the elu+1 feature map (and its causal prefix-sum form),
  Performer's FAVOR+ random features;
* :mod:`tfcourse.efficient.lowrank`: Linformer's projected keys and values;
* :mod:`tfcourse.efficient.lsh`: Reformer's locality-sensitive hashing by random rotations;
* :mod:`tfcourse.efficient.memory`: Transformer-XL's segment-level recurrence with relative positions, and the
  Compressive Transformer's compressed memory;
* :mod:`tfcourse.efficient.measure`: time and peak memory of a call, for the benchmarks.
"""
