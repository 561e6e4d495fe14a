"""Silencing library chatter that is not for dgrun's users (progress bars, experimental-API notices)."""

from __future__ import annotations

import contextlib
import logging


def quiet_libraries() -> None:
    """Silence library chatter that is not for dgrun's users (progress bars, experimental-API warnings)."""
    import warnings

    for name in ("diffusers", "transformers", "accelerate", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # "Loading weights" on every text encoder load
