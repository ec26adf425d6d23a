"""What cluster launch scripts (cluster/) need in Python: node lists and hostfiles
(`python -m bdt.cluster.hosts`) and the resume-on-restart wrapper (`python -m bdt.cluster.resume`).
Nothing here imports torch or DeepSpeed at module level, so the scripts start fast."""
