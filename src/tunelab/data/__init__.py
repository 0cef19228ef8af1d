"""Data: reading files or packaged sets into frames, seeded splits, and the encoded form tasks produce."""
from .encoded import IGNORE_INDEX, Encoded, config_pad_id, pad_rows, pad_token_id  # noqa: F401
from .io import read_frames, where  # noqa: F401
from .splits import split_frames, stratified_sample, stratified_split  # noqa: F401
from .packaged import with_packaged_defaults  # noqa: F401
