"""minibt: instruction backtranslation (Li et al. 2023) on one 4-bit base with QLoRA role adapters."""

import logging

__version__ = "0.1.0"


def _bnb_cpu_kernel_note(record: logging.LogRecord) -> bool:
    """bitsandbytes warns at import, on any CPU without the optional `kernels` package, that its optional
    CPU 4-bit kernel is missing; its built-in one serves, so the note goes to minibt's debug log only."""
    if str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"):
        logging.getLogger("minibt").debug("bitsandbytes: %s", record.getMessage())
        return False
    return True


# installed here, before any minibt module can import bitsandbytes (the filter waits on the logger by name)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_bnb_cpu_kernel_note)


def open_run(path, adapters=None):
    """Open a run directory for inference (see minibt.session)."""
    from minibt.session import open_run as _open

    return _open(path, adapters)
