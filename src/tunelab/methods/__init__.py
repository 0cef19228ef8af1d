"""Every public module here registers one fine-tuning method; they are found by listing this folder."""
from ..discovery import import_all


def discover() -> None:
    import_all(__name__, __path__)
