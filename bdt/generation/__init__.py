"""Generation: prompts -> binary token grids (sampling.py: next-patch diffusion with a KV cache),
-> pixels through the image tokenizer's decoder, as files and grids (grid.py); a trained model
(trained.py) loaded from an export, run dir or checkpoint (load.py, export_reader.py,
checkpoint_reader.py; a run's checkpoint weights and records: run_weights.py); the in-loop sample
grid (preview.py)."""
