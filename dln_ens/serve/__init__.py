"""`dln-ens serve`: any configured local backend (an HF model, a Mixture-of-Depths member, a fused
ensemble) behind an OpenAI-compatible /v1/completions API (vLLM's response shape)."""
