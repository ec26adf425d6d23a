"""Generation: prompts -> binary token grids (sampling.py: next-patch diffusion with a KV cache),
-> pixels through the image tokenizer's decoder, as files and grids (grid.py); a trained model
loaded from an export, run dir or checkpoint (trained.py; a run's checkpoint weights and records:
run_weights.py); the in-loop sample grid (preview.py)."""
