"""Training and evaluation of (fused) checkpoints: ``tune`` against the original, ``finetune`` (full or LoRA, classification or instruction data), perplexity, and ``torchrun`` support."""
