"""Model in, vectors out: config, quantisation, loading, E5 tokenisation and instructions, token-budget batches,
the query prefix cache, last-token pooling, and LoRA adapters."""
