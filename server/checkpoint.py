"""Global-model checkpoints written atomically after every round."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_torch_save"]

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with :func:`torch.save` to a temporary file, then rename it into place.

    A crash while writing leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    out_dir: Path, server_round: int, state_dict: dict[str, torch.Tensor],
    run_config: dict[str, Any],
) -> Path:
    """Save the global model after ``server_round``.

    Writes ``checkpoints/round-NNN.pt`` and updates ``model-latest.pt`` in ``out_dir``.
    Each file holds ``{"round", "state_dict", "run_config"}``.
    """
    payload = {"round": server_round, "state_dict": state_dict, "run_config": run_config}
    path = Path(out_dir) / "checkpoints" / f"round-{server_round:03d}.pt"
    atomic_torch_save(payload, path)
    atomic_torch_save(payload, Path(out_dir) / "model-latest.pt")
    log.debug("saved the global model of round %d to %s", server_round, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
