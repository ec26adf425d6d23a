"""Evaluation: the shapes judge (`judge`) and the fixed prompt suite (`suite`)."""
