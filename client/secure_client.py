"""A site's side of fedrad's secure aggregation (SecAgg+), one Flower message at a time.

In deployment every message runs in a fresh ClientApp process, so each protocol instance's
state (:meth:`SecAggClient.export_state`: private keys, Shamir shares, the self-mask secret)
is kept between messages in the node's ``context.state``, which Flower keeps on the site's
SuperNode (and, in simulation, in the simulated node's context).  None of it is ever put in a
reply: replies carry public keys, shares encrypted for one peer, the masked vector, and the
unmasking shares the protocol allows.

Operations (``secagg`` record of a message, see :mod:`fedrad.server.secure_rounds`):

* ``advertise``  (query): make fresh key pairs for the listed instances, reply the public keys;
* ``share-*``    (query): the instance's key list and parameters; reply encrypted shares;
* ``unmask-*``   (query): survivors and dropped sites; reply the allowed shares;
* ``receive-*``  (train / evaluate): the shares routed to this site, then mask the work's
  vector with them.

One query message may carry unmask, share and advertise operations of three successive
instances; they run in that order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedrad.common.arrays import all_finite
from fedrad.common.errors import FedradError
from fedrad.common.secagg import SecAggClient, SecAggParams
from fedrad.common.secagg.wire import params_from_json

__all__ = ["STATE_RECORD", "handle_query", "mask_vector"]

log = logging.getLogger(__name__)

#: Config record in ``context.state`` holding one JSON blob per protocol instance.
STATE_RECORD = "fedrad-secagg-state"
#: Instances older than the newest advertised one minus this are forgotten.
_KEEP = 4


def _states(state: Any) -> dict[int, dict[str, Any]]:
    if STATE_RECORD not in state:
        return {}
    record = state[STATE_RECORD]
    out: dict[int, dict[str, Any]] = {}
    for key, blob in record.items():
        try:
            out[int(key)] = json.loads(bytes(blob).decode())
        except (TypeError, ValueError):
            log.warning("secure aggregation: dropped an unreadable stored state %s", key)
    return out


def _store(state: Any, states: Mapping[int, dict[str, Any]]) -> None:
    from flwr.app import ConfigRecord

    state[STATE_RECORD] = ConfigRecord(
        {str(k): json.dumps(v).encode() for k, v in sorted(states.items())}
    )


def _client(states: Mapping[int, dict[str, Any]], instance: int, stage: str) -> SecAggClient:
    if instance not in states:
        raise FedradError(
            "secagg-no-state",
            f"this site holds no secure-aggregation keys for step {instance}; it takes no "
            "part in this step and rejoins with fresh keys",
        )
    client = SecAggClient.from_state(states[instance])
    if client.stage != stage:
        raise FedradError(
            "bad-stage",
            f"secure-aggregation step {instance} asked for {stage!r} but this site is at "
            f"{client.stage!r}",
        )
    return client


def _ints(record: Mapping[str, Any], key: str) -> list[int]:
    return [int(v) for v in record.get(key, [])]


def handle_query(ops: Mapping[str, Any], state: Any) -> dict[str, Any]:
    """Run the unmask, share and advertise operations of one query message.

    ``ops`` is the message's ``secagg`` record, ``state`` the node's ``context.state``
    (updated in place).  Returns the reply's ``secagg`` record.
    """
    states = _states(state)
    reply: dict[str, Any] = {}
    if "unmask-instance" in ops:
        k = int(ops["unmask-instance"])
        client = _client(states, k, "unmask")
        shares = client.unmask_shares(_ints(ops, "unmask-survivors"), _ints(ops, "unmask-dropped"))
        reply["unmask-instance"] = k
        for kind in ("b", "sk"):
            peers = sorted(shares[kind])
            reply[f"unmask-{kind}-peers"] = peers
            reply[f"unmask-{kind}"] = [shares[kind][p] for p in peers]
        states.pop(k)  # finished: the secrets of this instance are no longer needed
    if "share-instance" in ops:
        k = int(ops["share-instance"])
        client = _client(states, k, "share")
        params = params_from_json(str(ops["share-params"]))
        if params.round_id != k:
            raise FedradError("bad-params", "the parameters belong to another step")
        client.bind(int(ops["share-me"]), params)
        ids = _ints(ops, "share-ids")
        c_pks, s_pks = list(ops.get("share-c-pk", [])), list(ops.get("share-s-pk", []))
        if not (len(ids) == len(c_pks) == len(s_pks)):
            raise FedradError("bad-message", "the key list's columns differ in length")
        keys = {i: {"c_pk": bytes(c), "s_pk": bytes(s)}
                for i, c, s in zip(ids, c_pks, s_pks, strict=True)}
        cts = client.share_keys(keys)
        reply["shares-instance"] = k
        reply["shares-to"] = sorted(cts)
        reply["shares-cts"] = [cts[v] for v in sorted(cts)]
        states[k] = client.export_state()
    if "advertise" in ops:
        instances = _ints(ops, "advertise")
        c_pks, s_pks = [], []
        for k in instances:
            # a placeholder id and threshold: bind() sets them once the cohort is known
            client = SecAggClient(1, SecAggParams(threshold=2, round_id=k))
            keys = client.advertise_keys()
            c_pks.append(keys["c_pk"])
            s_pks.append(keys["s_pk"])
            states[k] = client.export_state()
        reply["advert-instances"] = instances
        reply["advert-c-pk"] = c_pks
        reply["advert-s-pk"] = s_pks
        newest = max(instances, default=max(states, default=0))
        for k in [k for k in states if k < newest - _KEEP]:
            states.pop(k)
    _store(state, states)
    return reply


def mask_vector(
    ops: Mapping[str, Any],
    state: Any,
    vector: np.ndarray,
    weight: float | None = None,
) -> tuple[int, np.ndarray]:
    """Receive the routed shares of the work's instance and mask ``vector`` with them.

    ``weight`` (the training sample count) is given for a weighted round; the public
    normaliser comes with the message.  Returns the instance and the masked ``uint32``
    vector.  Raises ``FedradError("non-finite")`` for NaN or Inf in ``vector``.
    """
    vector = np.asarray(vector, np.float64)
    if not all_finite(vector):
        raise FedradError(
            "non-finite",
            "the site's update holds NaN or Inf (training diverged); lower learning-rate",
        )
    states = _states(state)
    k = int(ops["work-instance"])
    client = _client(states, k, "receive")
    senders = _ints(ops, "receive-from")
    cts = list(ops.get("receive-cts", []))
    if len(senders) != len(cts):
        raise FedradError("bad-message", "the routed shares' columns differ in length")
    total = float(ops.get("work-total-weight", float("nan")))
    if client.params.weighted and (weight is None or not weight <= total):
        raise FedradError(
            "weight-above-bound",
            f"this site's {weight} samples exceed the round's public bound {total:g}; "
            "raise secagg-max-examples",
        )
    client.receive_shares({s: bytes(c) for s, c in zip(senders, cts, strict=True)})
    if client.params.weighted:
        masked = client.masked_input(vector, float(weight), total_weight=total)
    else:
        masked = client.masked_input(vector)
    if client.clipped:
        log.warning("secure aggregation: %d values were clipped to +-%g before masking; "
                    "raise secagg-clip", client.clipped, client.params.clip)
    states[k] = client.export_state()
    _store(state, states)
    return k, masked
