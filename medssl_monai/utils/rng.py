"""The process's global random generators (torch CPU/CUDA, numpy, python) as one checkpointable object.

Layer 0 so that any layer can save and restore them (training checkpoints, the k-NN monitor that must not
disturb the training stream); it holds no checkpoint logic of its own.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState"]

logger = logging.getLogger(__name__)


class RNGState:
    """The global torch (CPU and CUDA), numpy and python ``random`` generators as a checkpointable object.

    ``state_dict()`` contains only tensors, ints, floats, None, lists and dicts, so it survives
    ``torch.load(weights_only=True)``: numpy's state (a tuple with a uint32 array) and python's (a tuple of
    625 ints) are converted to int64 tensors.

    Note: each process has its own generators and only rank 0 writes checkpoints, so in distributed runs the
    other ranks resume with rank 0's state (reproducible, but not identical to an uninterrupted run).
    """

    def __init__(self, include_cuda: bool = True) -> None:
        self.include_cuda = include_cuda

    def state_dict(self) -> dict[str, Any]:
        np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
        py_version, py_internal, py_gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "bit_generator": str(np_name),
                "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "cached_gaussian": float(np_gauss),
            },
            "python": {
                "version": int(py_version),
                "internal": torch.tensor(py_internal, dtype=torch.int64),
                "gauss_next": None if py_gauss is None else float(py_gauss),
            },
        }
        if self.include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        torch.set_rng_state(torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu())
        npd = state_dict["numpy"]
        np.random.set_state((
            npd["bit_generator"],
            torch.as_tensor(npd["key"]).numpy().astype(np.uint32),
            int(npd["pos"]),
            int(npd["has_gauss"]),
            float(npd["cached_gaussian"]),
        ))
        pyd = state_dict["python"]
        internal = tuple(int(v) for v in torch.as_tensor(pyd["internal"]).tolist())
        random.setstate((int(pyd["version"]), internal, pyd["gauss_next"]))
        cuda = state_dict.get("cuda")
        if cuda is not None and self.include_cuda:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])
            else:
                logger.warning("checkpoint has CUDA RNG states for %d devices but %d are visible; CUDA RNG not "
                               "restored", len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)
