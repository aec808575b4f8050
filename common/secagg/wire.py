"""What fedrad's secure-aggregation messages carry, shared by the ClientApp and ServerApp.

Flower-free: the names of the records and fields, the public parameters as JSON, and the
flat vectors the sites mask: a model *update* (local minus global weights, plus the local
training loss) and evaluation counts (sample count, confusion matrix, score histograms).

Record names
------------
``secagg`` (a config record, both ways) holds the protocol operations of one message, see
:mod:`fedrad.server.secure_rounds` for the order; ``fedrad-echo`` (a config record) holds the
server round, the protocol instance and a per-round random nonce that every reply must echo
(a stale or replayed reply fails the comparison); ``masked`` (an array record) holds the
masked ``uint32`` vector under the key ``masked``.

Integer buffers
---------------
Integer tensors (BatchNorm's ``num_batches_tracked``) are sent as their change divided by
:data:`INT_SCALE`, so a change of up to ``clip * INT_SCALE`` steps fits the encoding; the
server multiplies back and rounds, giving the same weighted mean as plain FedAvg.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..arrays import all_finite
from ..errors import FedradError
from ..metrics import counts_from_metrics, counts_to_metrics
from .protocol import SecAggParams

__all__ = [
    "ECHO",
    "INT_SCALE",
    "MASKED",
    "QUERY_ACTION",
    "RECORD",
    "counts_length",
    "counts_to_vector",
    "params_from_json",
    "params_to_json",
    "update_length",
    "update_to_vector",
    "vector_to_counts",
    "vector_to_update",
]

RECORD = "secagg"
ECHO = "fedrad-echo"
MASKED = "masked"
#: Flower message type of the key-exchange and unmasking messages: ``query.secagg``.
QUERY_ACTION = "secagg"
#: Divisor of integer buffers' changes (see the module docstring).
INT_SCALE = 4096.0


def params_to_json(params: SecAggParams) -> str:
    """The public round parameters as JSON (sent to every site with the key list)."""
    return json.dumps({
        "threshold": params.threshold, "round_id": params.round_id, "clip": params.clip,
        "scale_bits": params.scale_bits, "degree": params.degree, "weighted": params.weighted,
    })


def params_from_json(text: str) -> SecAggParams:
    """Inverse of :func:`params_to_json`; ``FedradError("bad-params")`` if unreadable."""
    try:
        data = json.loads(text)
        return SecAggParams(
            threshold=int(data["threshold"]), round_id=int(data["round_id"]),
            clip=float(data["clip"]), scale_bits=int(data["scale_bits"]),
            degree=None if data["degree"] is None else int(data["degree"]),
            weighted=bool(data["weighted"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise FedradError("bad-params", "the secure-aggregation parameters are unreadable") from e


def update_length(reference: Mapping[str, np.ndarray]) -> int:
    """Length of the update vector of a model shaped like ``reference`` (plus the loss)."""
    return int(sum(np.asarray(v).size for v in reference.values())) + 1


def update_to_vector(
    local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], loss: float
) -> np.ndarray:
    """Flatten ``local - reference`` (in ``reference``'s key order) and append ``loss``.

    Raises ``FedradError`` ``"wrong-shape"`` if the models differ in keys or shapes and
    ``"non-finite"`` if the update or the loss holds NaN or Inf.
    """
    if list(local.keys()) != list(reference.keys()):
        raise FedradError(
            "wrong-shape", "the trained model's tensors differ from the global model's"
        )
    out = np.empty(update_length(reference), np.float64)
    offset = 0
    for name, ref in reference.items():
        ref = np.asarray(ref)
        new = np.asarray(local[name])
        if new.shape != ref.shape:
            raise FedradError("wrong-shape", f"tensor {name} changed shape during training")
        delta = out[offset : offset + ref.size]  # written in place, in float64
        np.subtract(new.reshape(-1), ref.reshape(-1), out=delta, dtype=np.float64)
        if ref.dtype.kind in "iub":
            delta /= INT_SCALE
        offset += ref.size
    out[-1] = float(loss)
    if not all_finite(out):
        raise FedradError(
            "non-finite",
            "the local update or training loss holds NaN or Inf (training diverged); "
            "lower learning-rate",
        )
    return out


def vector_to_update(
    mean: np.ndarray, reference: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float]:
    """Add a mean update vector to ``reference``; return the new arrays and the mean loss.

    Each array keeps ``reference``'s dtype (integers are rounded).
    """
    mean = np.asarray(mean, np.float64)
    if mean.shape != (update_length(reference),):
        raise FedradError("bad-length", "the aggregated update does not match the model")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, ref in reference.items():
        ref = np.asarray(ref)
        delta = mean[offset : offset + ref.size].reshape(ref.shape)
        offset += ref.size
        if ref.dtype.kind in "iub":
            out[name] = np.rint(ref.astype(np.float64) + delta * INT_SCALE).astype(ref.dtype)
        else:
            out[name] = (ref.astype(np.float64) + delta).astype(ref.dtype)
    return out, float(mean[-1])


def counts_length(num_classes: int, bins: int) -> int:
    """Length of an evaluation-counts vector."""
    return 2 + num_classes * num_classes + 2 * num_classes * bins


def counts_to_vector(
    metrics: Mapping[str, Any], *, num_classes: int, bins: int, train_examples: int
) -> np.ndarray:
    """``[num-examples, train-examples, confusion..., pos-hist..., neg-hist...]`` (float64).

    ``train-examples`` (the site's training-split size) is summed with the counts so the
    server learns the cohort's total, the next training round's weight normaliser, without
    any one site's count.
    """
    counts = counts_from_metrics(metrics)
    if counts.num_classes != num_classes or counts.bins != bins:
        raise FedradError(
            "wrong-shape",
            f"evaluation counts have {counts.num_classes} classes and {counts.bins} bins, "
            f"the run has {num_classes} and {bins}",
        )
    flat = counts_to_metrics(counts)
    vec = np.array(
        [int(metrics.get("num-examples", counts.n)), int(train_examples), *flat["confusion"],
         *flat["pos-hist"], *flat["neg-hist"]],
        np.float64,
    )
    return vec


def vector_to_counts(total: np.ndarray, *, num_classes: int, bins: int) -> dict[str, Any]:
    """Inverse of :func:`counts_to_vector` for a (summed) vector: the metrics mapping."""
    total = np.rint(np.asarray(total, np.float64)).astype(np.int64)
    if total.shape != (counts_length(num_classes, bins),):
        raise FedradError("bad-length", "the summed evaluation counts have a wrong length")
    c2, cb = num_classes * num_classes, num_classes * bins
    return {
        "num-examples": int(total[0]),
        "train-examples": int(total[1]),
        "num-classes": num_classes,
        "bins": bins,
        "confusion": [int(v) for v in total[2 : 2 + c2]],
        "pos-hist": [int(v) for v in total[2 + c2 : 2 + c2 + cb]],
        "neg-hist": [int(v) for v in total[2 + c2 + cb :]],
    }
