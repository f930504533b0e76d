"""Start a fit from another checkpoint's weights, with a fresh optimizer, schedule and epoch count.

``train.py fit --ckpt_path X`` *resumes* a run: it restores the optimizer, the learning-rate
schedule and the epoch counter as well, so a finished run cannot be trained on under a new
schedule (e.g. more defended epochs after a vanilla or a short defended run: a cosine schedule
resumed past its ``T_max`` climbs back up). This callback loads only the model's ``state_dict``
before training starts; everything else comes from the new run's config::

    python train.py fit --config configs/fashion_mnist_ctd.yaml \\
        --trainer.callbacks+=WarmStart --trainer.callbacks.init_args.ckpt_path runs/.../last.ckpt
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from robust_ranking.lightning_modules.checkpoint_io import UnsafeCheckpointError, load_checkpoint

__all__ = ["WarmStart"]


class WarmStart(pl.Callback):
    """Load a checkpoint's model weights (parameters and buffers) when ``fit`` starts.

    The weights are copied in place into the (already placed) module at ``on_fit_start``, so
    optimizers built on its parameters and every DDP rank see them; each rank reads the file.

    Args:
        ckpt_path: a Lightning checkpoint (its ``state_dict``) or a plain state dict file.
        strict: refuse missing or unexpected keys (the usual case: same model class and
            shapes). With ``strict=False`` the matching keys are loaded and the others listed.
    """

    def __init__(self, ckpt_path: str, strict: bool = True) -> None:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"WarmStart: checkpoint {str(path)!r} does not exist")
        self.ckpt_path = path
        self.strict = bool(strict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_start comes after a resumed run's weights are restored, so a warm start here
        # would silently overwrite them: refuse the combination instead.
        if trainer.ckpt_path is not None:
            raise ValueError("WarmStart and --ckpt_path both set the weights; use one of them")
        # Read without running anything from the file (weights_only): a payload is refused.
        try:
            loaded = load_checkpoint(self.ckpt_path, map_location="cpu")
        except UnsafeCheckpointError as err:
            raise ValueError(f"WarmStart: {err}") from None
        state = loaded.get("state_dict", loaded)
        if not isinstance(state, dict):
            raise ValueError(f"WarmStart: {str(self.ckpt_path)!r} holds no state dict")
        try:
            result = pl_module.load_state_dict(state, strict=self.strict)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ValueError(
                f"WarmStart: {str(self.ckpt_path)!r} does not fit {type(pl_module).__name__} ({first}); "
                "pass strict=False to load only the matching weights"
            ) from err
        skipped = list(result.missing_keys) + list(result.unexpected_keys)
        note = f" (not loaded: {', '.join(skipped)})" if skipped else ""
        rank_zero_info(f"WarmStart: weights of {self.ckpt_path}{note}")
