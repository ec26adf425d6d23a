"""The AR model's training loop (`deepspeed bdt/train.py`): its config tree, progressive stages,
data rows, checkpoint contents, export and FLOP counting, on bdt.training's infrastructure.

Previews and in-loop evaluation are generation, a layer above: the loop runs the `InLoopTask`s
its caller builds (bdt/train.py) and knows nothing of how they sample or judge.
"""
