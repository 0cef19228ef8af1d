"""Which base model an artifact was trained on, beyond its path: an adapter (LoRA, BitFit's biases, a prompt)
only means what it was trained to mean on the same base weights, and a folder can be overwritten in place, or
another model can come to stand under the same name."""
from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 1 << 16
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")


def weights_fingerprint(model_path: str | Path) -> str:
    """A hash of the config and of samples spread over every weight file (with their names and sizes): reading
    1 MB a file, not the weights whole (a 7B model's 14 GB would take a minute to hash). Retraining or replacing
    a model changes every sample; an edit to a few bytes between them can escape it."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern)}) + [folder / "config.json"]
    for path in files:
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for i in range(SAMPLES_PER_FILE):
                fh.seek(size * i // SAMPLES_PER_FILE)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:20]
