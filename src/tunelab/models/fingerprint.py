"""Which base model an artifact was trained on, beyond its path: an adapter (LoRA, BitFit's biases, a prompt)
only means what it was trained to mean on the same base weights, and a folder can be overwritten in place, or
another model can come to stand under the same name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .hub import WEIGHT_FORMATS

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 1 << 16


def weights_fingerprint(model_path: str | Path) -> str:
    """A hash of the config (without the transformers version that saved it) and of samples spread over each
    weight file the model loads (with their names and sizes): reading 1 MB a file, not the weights whole (a 7B
    model's 14 GB would take a minute to hash). Retraining or replacing a model changes every sample; an edit
    to a few bytes between them can escape it."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        try:
            settings = json.loads(config.read_text())
            settings.pop("transformers_version", None)
            digest.update(json.dumps(settings, sort_keys=True).encode())
        except (OSError, ValueError, AttributeError):
            digest.update(config.read_bytes())
    # the weights from_pretrained reads, in its order of preference: other files beside them (training_args.bin,
    # a second export such as consolidated.safetensors, a .bin copy fetched later) do not make it another model
    weights = next((files for patterns in WEIGHT_FORMATS if (files := sorted(folder.glob(patterns[0])))), [])
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for i in range(SAMPLES_PER_FILE):
                fh.seek(size * i // SAMPLES_PER_FILE)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:20]
