"""Ray pre-extraction: raw image-caption data -> binary-token webdataset shards + manifest (system §1).

config.py (ExtractConfig), input_units.py (inputs listed as units), input_reading.py (a unit
read robustly, rejects), worker.py (the Ray actor holding the tokenizer), manifest.py (layout,
markers, index.json), run.py (the driver).
Entry point: pipelines/extract_tokens.py.
"""
