"""What makes a training step fast and what gets trained.

`methods` builds the trained network (full, Half Fine-Tuning, or a PEFT adapter over a possibly quantised
base, `quantization`); `loss` computes the answer-only losses and `forward` the decoder paths they use
(shared prompt prefix, unpadded rows, the last layer on answer positions); `attention`, `fused_lora` and
`fused_rmsnorm` are the CPU kernels those paths call. Stage 4's loop (`tasks.finetune.loop`) steers them
with a `forward.Kernels` value, never a process-wide switch.
"""
