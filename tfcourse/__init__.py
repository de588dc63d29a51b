"""tfcourse: reference PyTorch implementations for an executable course on attention and transformers.

Each module mirrors a part of the book:

* :mod:`tfcourse.attention`: scoring functions, masked softmax, scaled dot-product, multi-head, cross and
  grouped-query attention, the KV cache (chapters 1 and 3);
* :mod:`tfcourse.positional`: sinusoidal, learned, relative (T5), rotary and ALiBi positions (chapter 4);
* :mod:`tfcourse.layers`: feed-forward and GLU networks, RMSNorm, encoder and decoder layers (chapter 5);
* :mod:`tfcourse.training` (losses, schedules, parameter groups, the training loop with checkpoints) and
  :mod:`tfcourse.decoding` (greedy and beam search) (chapter 6 onwards);
* :mod:`tfcourse.models`: whole models, one file each (the seq2seq RNN with attention of chapter 2, the
  Transformer of chapter 6, BERT, GPT and the Vision Transformer of chapters 8, 9 and 11);
* :mod:`tfcourse.peft`: parameter-efficient fine-tuning, LoRA, adapters and prompt tuning (chapter 10);
* :mod:`tfcourse.efficient`: sparse, low-rank, linear, LSH and recurrent-memory attention, and FlashAttention in
  PyTorch and Triton (chapter 12);
* :mod:`tfcourse.scaling`: parameter, FLOP and memory counts, power-law and Chinchilla fits (chapter 13);
* :mod:`tfcourse.moe`, :mod:`tfcourse.compress`, :mod:`tfcourse.recurrent`, :mod:`tfcourse.hybrids`: mixtures of
  experts; distillation, quantization and pruning; RWKV, RetNet and selective scans; Conformer, graph attention and
  a CLIP loss (chapter 14);
* :mod:`tfcourse.interpret`: recording attention, entropy, rollout, flow, head ablation, attributions, probes
  (chapter 15);
* :mod:`tfcourse.data`: data generated or read offline (the number-word translation task of chapter 2, ...);
* :mod:`tfcourse.device` (device, seeding and the ``TFCOURSE_SCALE`` knob) and :mod:`tfcourse.viz` (figures and
  widgets).
"""

__version__ = "0.1.0"
