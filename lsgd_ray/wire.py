"""How weights travel (``TrainConfig.comm_dtype``), in NumPy only: the ParameterServer, which
never imports torch, encodes the center and decodes the workers' differences with it.

bfloat16 travels as its bit pattern in an int16 array (NumPy has no bfloat16); an int16 array
of weights is never anything else. Rounding is to the nearest bfloat16, ties to even, as
torch's ``Tensor.to(torch.bfloat16)`` rounds (``tests/test_comm_dtype.py`` compares the two).
"""

from __future__ import annotations

import numpy as np

from lsgd_ray.config_checks import COMM_DTYPES

WIRE_SIZE = {"float32": 4, "bfloat16": 2}  # bytes per weight as it travels
_QUIET_NAN = np.uint32(0x0040)  # a NaN keeps its sign and stays a NaN after the top 16 bits are kept


def encode(weights: np.ndarray, comm_dtype: str) -> np.ndarray:
    """``weights`` (float32) as they travel: unchanged for "float32"; for "bfloat16" rounded to
    the nearest bfloat16 (ties to even), half the bytes."""
    if comm_dtype == "float32":
        return weights
    if comm_dtype != "bfloat16":
        raise ValueError(f"comm_dtype must be one of {COMM_DTYPES}, got {comm_dtype!r}")
    bits = np.ascontiguousarray(weights, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(weights)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16) | _QUIET_NAN
    return rounded.astype(np.uint16).view(np.int16)


def decode(array: np.ndarray) -> np.ndarray:
    """Weights as they travelled (``encode``), as float32: bfloat16 widened exactly."""
    if array.dtype != np.int16:
        return array
    return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
