"""bdt: train BitDance-style binary-token autoregressive text-to-image models."""
