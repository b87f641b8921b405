"""The modeling code copied into every fused checkpoint (trust_remote_code): it imports torch and transformers only, never mlpfuse."""
