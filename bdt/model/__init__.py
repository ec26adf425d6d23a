"""The AR model (method §2-4): backbone, sequence layout, diffusion head, flow, attention.

Import from the submodules (`bdt.model.head`, `bdt.model.flow`, `bdt.model.attention`, ...);
nothing is re-exported here so importing one part never drags in (or cycles through) the others.
"""
