"""minibt: instruction backtranslation (Li et al. 2023) on one 4-bit base with QLoRA role adapters."""

__version__ = "0.1.0"


def open_run(path, adapters=None):
    """Open a run directory for inference (see minibt.session)."""
    from minibt.session import open_run as _open

    return _open(path, adapters)
