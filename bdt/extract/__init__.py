"""Ray pre-extraction: raw image-caption data -> binary-token webdataset shards + manifest (system §1).

config.py (ExtractConfig), inputs.py (listing + robust reading, rejects), worker.py (the Ray
actor holding the tokenizer), manifest.py (layout, markers, index.json), run.py (the driver).
Entry point: pipelines/extract_tokens.py.
"""
