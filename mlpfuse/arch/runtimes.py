"""Which serving runtimes load which architectures: the facts ``mlpfuse inspect`` reports from.

``VLLM_ARCHITECTURES``: transformers ``architectures`` names that vLLM implements natively (from vLLM's
list of supported models; vLLM is not installed here, so these are untested: docs/deploy.md). A fused
checkpoint's custom modules (scaled and low-rank projections) have no vLLM implementation, so vLLM needs
the exported checkpoint. llama.cpp: :mod:`mlpfuse.arch.gguf_table`.
"""

from __future__ import annotations

VLLM_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "GraniteForCausalLM", "StableLmForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
    "FalconForCausalLM", "Starcoder2ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM", "GPTJForCausalLM",
    "GPTBigCodeForCausalLM", "BloomForCausalLM", "OPTForCausalLM", "ExaoneForCausalLM", "NemotronForCausalLM",
    "GlmForCausalLM", "BertModel", "RobertaModel", "XLMRobertaModel",
})
