"""Secure aggregation (SecAgg+) over Flower messages: the ServerApp only sees sums.

Every round runs two protocol *instances* (``k = 2r - 1`` trains, ``k = 2r`` evaluates),
each with fresh keys; instance ``k = 0`` evaluates the initial model before round 1 (a
pooled round-0 row, and the census below).  Messages are pipelined so that each instance
costs two round trips::

    start    query.secagg  advertise(0, 1)                         -> public keys
             query.secagg  share(0)                                -> encrypted shares
    each k   train|evaluate  model + routed shares of k            -> masked vector
             query.secagg  unmask(k) + share(k+1) + advertise(k+2) -> shares of k, of k+1, keys

So a run of ``R`` rounds costs ``4 R + 4`` trips (plain FedAvg: ``R + 1`` with
``evaluate-with-training``, else ``2 R``; Flower's SecAgg+ workflow: 4 per training round plus
one per evaluation).  A site that drops out of one
instance gets the ``advertise`` operation in the next batch and rejoins two instances later.

What the server learns
----------------------
Training: the survivors' weighted mean update ``sum(w_i * d_i) / sum(w_i)`` (``w_i`` the
sample counts, masked inside the vector as ``w_i / W``, see
:mod:`fedrad.common.secagg.encoding`), their total sample count and mean training loss.
``W`` is public: each evaluation also sums the sites' training-split sizes (a census), and
the next training round uses that total while its cohort is a subset of the census's (a
tight normaliser, so the quantisation bound stays near ``n * 2**-scale_bits``); otherwise
``secagg-max-examples``.  Evaluation: the exact sums of the survivors' confusion matrices and
score histograms, so only *pooled* metric rows exist (no per-site rows; set
``secure-aggregation=false`` to get them).

Failures
--------
Every reply is checked (echoed round nonce, record present, dtype, shape, length); a bad
one excludes that site from the instance with a reason code, logged and kept in the round's
failure list, and the site counts as dropped, so its pairwise masks are recovered from the
others' shares.  With more than ``n - t`` sites lost after sharing keys, the instance fails
cleanly: the masked sum is discarded, the global model stays, and the next instance runs
with new keys.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrad.common.arrays import array_values, packed_content
from fedrad.common.config import Settings
from fedrad.common.errors import FedradError
from fedrad.common.metrics import counts_from_metrics, pooled_metrics
from fedrad.common.secagg import SecAggParams, SecAggServer, max_scale_bits, neighbours, shamir
from fedrad.common.secagg.wire import (
    ECHO,
    MASKED,
    QUERY_ACTION,
    RECORD,
    counts_length,
    params_to_json,
    update_length,
    vector_to_counts,
    vector_to_update,
)

__all__ = ["ReplyStream", "SecureRounds", "auto_threshold", "check_masked_reply",
           "trips_per_run"]

log = logging.getLogger(__name__)

#: Share ciphertext length: nonce + two shares + tag (see the protocol module).
_SHARE_CT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


def trips_per_run(num_rounds: int) -> int:
    """Message round trips of a secure run of ``num_rounds`` rounds (see the docstring)."""
    return 4 * num_rounds + 4


def auto_threshold(neighbourhood: int) -> int:
    """Default ``t``: a strict majority of the neighbourhood (itself included), at least 2."""
    return max(2, neighbourhood // 2 + 1)


class ReplyRejected(FedradError):
    """A site's reply failed validation; ``code`` says why."""


#: Set whenever replies may have arrived.  Flower's simulation engine stores each site's
#: reply in the ServerApp's own process, and fedrad's engine sets this as it does
#: (:func:`fedrad.simulations.engine.wake_on_reply`), so a waiting :class:`ReplyStream`
#: pulls at once instead of at its next poll.  Nothing sets it in a deployment, where
#: replies reach a SuperLink in another process: there the stream polls as before.
REPLIES_STORED = threading.Event()


class ReplyStream:
    """Push messages now; iterate over their replies as they arrive, each one once.

    Flower's ``grid.send_and_receive`` returns only when every reply is in, so the server
    would hold every site's reply (a whole model or masked vector each) at once.  This
    pushes the messages (``grid.push_messages``) and polls ``grid.pull_messages`` for the
    ones still pending, yielding ``(node, reply)`` as soon as a reply is pulled: the caller
    folds it into a running sum and drops it, so the server's memory does not grow with
    the number of sites.  Polling starts every :attr:`poll_start` seconds and backs off to
    :attr:`poll_max` while nothing arrives; :data:`REPLIES_STORED` cuts a wait short.

    Semantics are those of ``send_and_receive(messages, timeout=timeout)``: replies not
    pulled within ``timeout`` seconds after the push are never yielded (the caller counts those
    nodes as not answering, :meth:`missing`); a second reply to the same message is ignored,
    and so is a reply to a message this stream did not send.  A grid without
    ``push_messages`` (a test double) is asked through ``send_and_receive``.
    """

    poll_start = 0.005
    poll_max = 0.1

    def __init__(self, grid: Grid, messages: Iterable[Message], *,
                 timeout: float | None) -> None:
        messages = list(messages)
        self._grid = grid
        self._asked = [int(m.metadata.dst_node_id) for m in messages]
        self._answered: list[int] = []
        self._batch: Iterable[Message] | None = None
        if hasattr(grid, "push_messages") and hasattr(grid, "pull_messages"):
            ids = list(grid.push_messages(messages))
        else:
            self._batch = grid.send_and_receive(messages, timeout=timeout)
            ids = [m.metadata.message_id for m in messages]
        # as in send_and_receive, the timeout runs from the end of the push
        self._deadline = math.inf if timeout is None else time.monotonic() + timeout
        # a message the grid could not push has no id (None): its node never answers
        self._pending = {str(mid): node for mid, node in zip(ids, self._asked, strict=False)
                         if mid}

    @property
    def answered(self) -> list[int]:
        """The nodes whose reply has been yielded, in arrival order."""
        return list(self._answered)

    def missing(self) -> list[int]:
        """The nodes asked that have not answered (yet, or before the timeout)."""
        done = set(self._answered)
        return [n for n in self._asked if n not in done]

    def _take(self, reply: Message) -> int | None:
        return self._pending.pop(str(reply.metadata.reply_to_message_id), None)

    def __iter__(self) -> Iterator[tuple[int, Message]]:
        if self._batch is not None:
            batch, self._batch = list(self._batch), None
            while batch:
                reply = batch.pop(0)
                if (node := self._take(reply)) is not None:
                    self._answered.append(node)
                    yield node, reply
            return
        interval = self.poll_start
        while self._pending:
            REPLIES_STORED.clear()  # a reply stored from here on ends the wait below
            pulled = list(self._grid.pull_messages(list(self._pending)))
            got = bool(pulled)
            while pulled:  # hand over one at a time, so that each can be freed at once
                reply = pulled.pop(0)
                if (node := self._take(reply)) is not None:
                    self._answered.append(node)
                    yield node, reply
                del reply
            now = time.monotonic()
            if not self._pending or now >= self._deadline:
                break
            interval = self.poll_start if got else min(2 * interval, self.poll_max)
            REPLIES_STORED.wait(min(interval, self._deadline - now))


def check_masked_reply(content: RecordDict, *, expected_length: int, instance: int) -> np.ndarray:
    """Validate a work reply's masked vector without trusting its size; return it.

    Codes: ``malformed`` (record missing), ``wrong-step``, ``bad-dtype``, ``wrong-shape``,
    ``oversized``, ``truncated``.
    """
    if MASKED not in content.array_records or MASKED not in content.array_records[MASKED]:
        raise ReplyRejected("malformed", "the reply holds no masked vector")
    ops = content.config_records.get(RECORD)
    if ops is None or int(ops.get("work-instance", -1)) != instance:
        raise ReplyRejected("wrong-step", "the masked vector belongs to another step")
    array: Array = content.array_records[MASKED][MASKED]
    if array.dtype != "uint32":
        raise ReplyRejected("bad-dtype", f"the masked vector is {array.dtype}, not uint32")
    if len(array.shape) != 1:
        raise ReplyRejected("wrong-shape", f"the masked vector has shape {array.shape}")
    if array.shape[0] > expected_length or len(array.data) > 4 * expected_length + 1024:
        raise ReplyRejected(
            "oversized", f"{array.shape[0]} elements sent, {expected_length} expected"
        )
    if array.shape[0] < expected_length:
        raise ReplyRejected(
            "truncated", f"{array.shape[0]} elements sent, {expected_length} expected"
        )
    try:
        vec = array_values(array)  # a read-only view: the sum copies the first one it adds
    except ValueError as err:
        raise ReplyRejected("malformed", f"the masked vector: {err}") from None
    if vec.dtype != np.uint32 or vec.shape != (expected_length,):
        raise ReplyRejected("malformed", "the masked vector's data do not match its header")
    return vec


@dataclass
class _Instance:
    k: int
    kind: str  # "train" | "evaluate"
    server_round: int
    adverts: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> keys
    index: dict[int, int] = field(default_factory=dict)  # Flower node id -> protocol id
    server: SecAggServer | None = None
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    total_weight: float = float("nan")
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    failed: str | None = None
    nonce: bytes = b""

    def node_of(self, idx: int) -> int:
        return next(n for n, i in self.index.items() if i == idx)


class SecureRounds:
    """Run a federation with every sum computed under SecAgg+ (see the module docstring).

    Parameters
    ----------
    grid:
        Flower's grid.
    settings:
        Run settings (threshold, degree, clip, min-sites...).
    on_failure:
        Called with ``(server_round, text)`` for every excluded site or failed step.
    on_pooled:
        Called with ``(server_round, pooled_metrics_row, n)`` after a secure evaluation.
    timeout:
        Seconds to wait for one batch of replies.
    """

    def __init__(
        self,
        grid: Grid,
        settings: Settings,
        *,
        on_failure: Callable[[int, str], None],
        on_pooled: Callable[[int, dict[str, Any], int], None],
        timeout: float = 3600.0,
    ) -> None:
        self.grid = grid
        self.settings = settings
        self.on_failure = on_failure
        self.on_pooled = on_pooled
        self.timeout = timeout
        self.instances: dict[int, _Instance] = {}
        self.last_k = 2 * settings.num_server_rounds
        self._census: tuple[float, set[int]] | None = None  # training samples, sites
        self.trips = 0
        self.train_metrics: dict[int, dict[str, float]] = {}
        #: optional :class:`~fedrad.server.status.StatusWriter` shown by ``fedrad status``
        self.status: Any = None
        #: optional ``(current, mean) -> next`` model (a server optimiser, see
        #: :meth:`fedrad.server.strategies.Aggregator.server_step`); None keeps the mean
        self.server_step: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]],
                                   dict[str, np.ndarray]] | None = None

    # ----------------------------------------------------------------- messaging
    def _nodes(self) -> list[int]:
        while len(nodes := sorted(self.grid.get_node_ids())) < self.settings.min_sites:
            log.info("secure aggregation: waiting for sites: %d connected, %d needed",
                     len(nodes), self.settings.min_sites)
            time.sleep(1.0)
        return nodes

    def _send(self, contents: Mapping[int, RecordDict], message_type: str, server_round: int,
              nonce: bytes, take: Callable[[int, RecordDict], None]) -> list[int]:
        """Send one batch; hand each usable reply to ``take(node, content)`` as it arrives.

        A reply is *usable* once it is no error and echoes ``nonce`` (see :meth:`_usable`);
        it is dropped as soon as ``take`` returns.  Nodes without a reply before the
        timeout are excluded (``no-reply``).  Returns the nodes that replied.
        """
        if not contents:
            return []
        messages = [Message(content=c, dst_node_id=n, message_type=message_type,
                            group_id=str(server_round)) for n, c in contents.items()]
        if self.status is not None:
            self.status.step(server_round, f"secure {message_type}", asked=list(contents))
        stream = ReplyStream(self.grid, messages, timeout=self.timeout)
        del messages
        answered: list[int] = []
        for node, reply in stream:
            if int(reply.metadata.src_node_id) != node:
                continue  # answered by someone else (the SuperLink): no reply from node
            answered.append(node)
            if (content := self._usable(server_round, node, reply, nonce)) is not None:
                take(node, content)
            del reply, content
        self.trips += 1
        if self.status is not None:
            self.status.replies(answered)
        done = set(answered)
        for node in contents:
            if node not in done:
                self._exclude(server_round, node, "no-reply", "no reply before the timeout")
        return answered

    def _exclude(self, server_round: int, node: int, code: str, message: str) -> None:
        text = f"secure aggregation: node {node} excluded: [{code}] {message}"
        log.warning("round %d %s", server_round, text)
        self.on_failure(server_round, text)

    def _usable(self, server_round: int, node: int, reply: Message,
                nonce: bytes) -> RecordDict | None:
        if reply.has_error():
            self._exclude(server_round, node, "site-error", str(reply.error.reason))
            return None
        echo = reply.content.config_records.get(ECHO)
        if echo is None:
            self._exclude(server_round, node, "malformed", "the reply does not echo the nonce")
            return None
        if bytes(echo.get("nonce", b"")) != nonce or int(echo.get("server-round", -1)) != (
            server_round
        ):
            self._exclude(server_round, node, "replayed",
                          "the reply echoes another round's nonce (stale or replayed)")
            return None
        return reply.content

    def _echo(self, server_round: int, nonce: bytes) -> ConfigRecord:
        return ConfigRecord({"server-round": server_round, "nonce": nonce})

    # ----------------------------------------------------------------- instances
    def _instance(self, k: int) -> _Instance:
        if k not in self.instances:
            self.instances[k] = _Instance(k=k, kind="train" if k % 2 else "evaluate",
                                          server_round=(k + 1) // 2)
        return self.instances[k]

    def _fail(self, inst: _Instance, message: str) -> None:
        inst.failed = message
        inst.server = None  # the masked sum, if any, is dropped with it
        text = f"secure {inst.kind}: step failed: {message}"
        log.warning("round %d %s", inst.server_round, text)
        self.on_failure(inst.server_round, text)

    def _freeze(self, inst: _Instance) -> None:
        """Fix the cohort of ``inst`` from its adverts; build its server and key list."""
        nodes = sorted(inst.adverts)
        n = len(nodes)
        if n < max(2, self.settings.min_sites):
            self._fail(inst, f"{n} sites hold keys; secure aggregation needs at least "
                             f"{max(2, self.settings.min_sites)} (min-sites)")
            return
        s = self.settings
        degree = s.secagg_degree if 0 < s.secagg_degree < n - 1 else None
        hood = n if degree is None else degree + 1
        threshold = s.secagg_threshold or auto_threshold(hood)
        if threshold > hood:
            self._fail(inst, f"secagg-threshold={threshold} exceeds the {hood} sites of a "
                             "neighbourhood; lower it or add sites")
            return
        inst.index = {node: i + 1 for i, node in enumerate(nodes)}
        if inst.kind == "train":
            clip = float(s.secagg_clip)
            bits = min(max_scale_bits(n, clip=clip, weighted=True), 30)
            params = SecAggParams(threshold=threshold, round_id=inst.k, clip=clip,
                                  scale_bits=bits, degree=degree, weighted=True)
            length = update_length(self._reference)
        else:
            clip = float(2 ** (30 - math.ceil(math.log2(n))))  # exact integer counts
            params = SecAggParams(threshold=threshold, round_id=inst.k, clip=clip,
                                  scale_bits=0, degree=degree, weighted=False)
            length = counts_length(s.num_classes, s.score_bins)
        server = SecAggServer(params, vector_length=length)
        try:
            server.collect_keys({inst.index[u]: {"c_pk": c, "s_pk": p}
                                 for u, (c, p) in inst.adverts.items()})
        except FedradError as e:
            self._fail(inst, f"[{e.code}] {e.message}")
            return
        inst.server = server

    def _share_op(self, inst: _Instance, node: int) -> dict[str, Any]:
        ids = sorted(inst.index.values())
        keys = {inst.index[u]: v for u, v in inst.adverts.items()}
        assert inst.server is not None
        return {
            "share-instance": inst.k,
            "share-params": params_to_json(inst.server.params),
            "share-me": inst.index[node],
            "share-ids": ids,
            "share-c-pk": [keys[i][0] for i in ids],
            "share-s-pk": [keys[i][1] for i in ids],
        }

    def _take_adverts(self, server_round: int, node: int, ops: Mapping[str, Any]) -> None:
        ks = [int(v) for v in ops.get("advert-instances", [])]
        c_pks, s_pks = list(ops.get("advert-c-pk", [])), list(ops.get("advert-s-pk", []))
        if not len(ks) == len(c_pks) == len(s_pks):
            self._exclude(server_round, node, "malformed", "the key advertisement is ragged")
            return
        for k, c, p in zip(ks, c_pks, s_pks, strict=True):
            inst = self.instances.get(k)
            if inst is None or inst.server is not None or inst.failed:
                continue  # not asked for, or the cohort is already fixed
            if len(bytes(c)) != 32 or len(bytes(p)) != 32:
                self._exclude(server_round, node, "bad-key", "a public key is not 32 bytes")
                continue
            inst.adverts[node] = (bytes(c), bytes(p))

    def _take_shares(self, inst: _Instance, node: int, ops: Mapping[str, Any],
                     outgoing: dict[int, dict[int, bytes]]) -> None:
        if int(ops.get("shares-instance", -1)) != inst.k:
            self._exclude(inst.server_round, node, "wrong-step", "no shares for this step")
            return
        me = inst.index[node]
        assert inst.server is not None
        allowed = set(neighbours(me, inst.index.values(), inst.server.params.degree))
        to = [int(v) for v in ops.get("shares-to", [])]
        cts = [bytes(v) for v in ops.get("shares-cts", [])]
        if (len(to) != len(cts) or not set(to) <= allowed or len(set(to)) != len(to)
                or any(len(c) != _SHARE_CT_BYTES for c in cts)):
            self._exclude(inst.server_round, node, "malformed",
                          "the encrypted shares do not match the neighbourhood")
            return
        outgoing[me] = dict(zip(to, cts, strict=True))

    def _route(self, inst: _Instance, outgoing: dict[int, dict[int, bytes]]) -> None:
        assert inst.server is not None
        try:
            inst.inbox = inst.server.route_shares(outgoing)
        except FedradError as e:
            self._fail(inst, f"[{e.code}] {e.message}")

    # ----------------------------------------------------------------- the run
    def run(self, arrays: ArrayRecord, after_round: Callable[[int, ArrayRecord], None], *,
            start_round: int = 0) -> ArrayRecord:
        """Run the rounds after ``start_round`` from ``arrays``; ``after_round(r, arrays)``.

        ``start_round`` > 0 resumes a run whose round ``start_round`` completed (``arrays``
        is its global model): the first step re-evaluates that model, which also gives the
        next training round its sample-count census, then training goes on.
        """
        self._reference = {k: array_values(v) for k, v in arrays.items()}  # views
        k0 = 2 * start_round
        first = [k0, k0 + 1]
        for k in first:
            self._instance(k)
        nonce = os.urandom(16)
        self._send({n: RecordDict({RECORD: ConfigRecord({"advertise": first}),
                                   ECHO: self._echo(start_round, nonce)})
                    for n in self._nodes()}, f"query.{QUERY_ACTION}", start_round, nonce,
                   lambda node, content: self._take_adverts(
                       start_round, node, content.config_records.get(RECORD, {})))
        inst = self.instances[k0]
        self._freeze(inst)
        if inst.server is not None:
            outgoing: dict[int, dict[int, bytes]] = {}
            self._send({n: RecordDict({RECORD: ConfigRecord(self._share_op(inst, n)),
                                       ECHO: self._echo(start_round, nonce)})
                        for n in inst.index}, f"query.{QUERY_ACTION}", start_round, nonce,
                       lambda node, content: self._take_shares(
                           inst, node, content.config_records.get(RECORD, {}), outgoing))
            self._route(inst, outgoing)
        for k in range(k0, self.last_k + 1):
            inst = self.instances[k]
            if inst.kind == "train":
                self._reference = {name: array_values(v) for name, v in arrays.items()}
            self._work(inst, arrays)
            self._unmask_and_advance(inst)
            arrays = self._finish(inst, arrays)
            if inst.kind == "evaluate" and k > k0:
                after_round(inst.server_round, arrays)
        return arrays

    def _work(self, inst: _Instance, arrays: ArrayRecord) -> None:
        if inst.server is None:
            return
        s = self.settings
        if inst.kind == "train":
            cohort = {inst.node_of(i) for i in inst.inbox}
            if self._census is not None and self._census[0] >= 1 and cohort <= self._census[1]:
                inst.total_weight = float(self._census[0])
            else:
                inst.total_weight = float(s.secagg_max_examples)
                log.info("round %d: no census covers this training cohort; the weight "
                         "normaliser is secagg-max-examples=%d", inst.server_round,
                         s.secagg_max_examples)
        inst.nonce = os.urandom(16)
        config = ConfigRecord({**s.to_site_config(), "server-round": inst.server_round})
        contents = {}
        model = packed_content(arrays)  # packed once, the same for every site
        for idx, shares in inst.inbox.items():
            ops: dict[str, Any] = {"work-instance": inst.k,
                                   "receive-from": sorted(shares),
                                   "receive-cts": [shares[v] for v in sorted(shares)]}
            if inst.kind == "train":
                ops["work-total-weight"] = inst.total_weight
            contents[inst.node_of(idx)] = RecordDict({
                **model, "config": config, RECORD: ConfigRecord(ops),
                ECHO: self._echo(inst.server_round, inst.nonce)})
        server = inst.server

        def add(node: int, content: RecordDict) -> None:
            # folded into the masked sum at once: no masked vector outlives this call
            try:
                vec = check_masked_reply(content, expected_length=server.input_length,
                                         instance=inst.k)
                server.add_masked_input(inst.index[node], vec)
            except FedradError as e:
                self._exclude(inst.server_round, node, e.code, e.message)

        self._send(contents, inst.kind, inst.server_round, inst.nonce, add)
        del contents
        try:
            survivors, dropped = inst.server.unmask_request()
        except FedradError as e:
            self._fail(inst, f"[{e.code}] {e.message}")
            return
        if len(survivors) < s.min_sites:
            self._fail(inst, f"{len(survivors)} sites sent masked inputs, fewer than "
                             f"min-sites={s.min_sites}; nothing is unmasked")
            return
        inst.survivors, inst.dropped = survivors, dropped

    def _unmask_and_advance(self, inst: _Instance) -> None:
        """One batch: unmask ``inst``, share keys of the next, advertise the one after."""
        nxt = self.instances.get(inst.k + 1)
        if nxt is not None and nxt.server is None and nxt.failed is None:
            self._freeze(nxt)
        later = inst.k + 2
        if later <= self.last_k:
            self._instance(later)
        nonce = os.urandom(16)
        contents: dict[int, RecordDict] = {}
        for node in self._nodes():
            ops: dict[str, Any] = {}
            if inst.server is not None and inst.index.get(node) in inst.survivors:
                ops.update({"unmask-instance": inst.k, "unmask-survivors": inst.survivors,
                            "unmask-dropped": inst.dropped})
            if nxt is not None and nxt.server is not None and node in nxt.index:
                ops.update(self._share_op(nxt, node))
            if later <= self.last_k:
                ops["advertise"] = [later]
            if ops:
                contents[node] = RecordDict({RECORD: ConfigRecord(ops),
                                             ECHO: self._echo(inst.server_round, nonce)})
        outgoing: dict[int, dict[int, bytes]] = {}

        def take(node: int, content: RecordDict) -> None:
            ops = content.config_records.get(RECORD, ConfigRecord())
            if inst.server is not None and inst.index.get(node) in inst.survivors:
                self._take_unmask(inst, node, ops)
            if nxt is not None and nxt.server is not None and node in nxt.index:
                self._take_shares(nxt, node, ops, outgoing)
            self._take_adverts(inst.server_round, node, ops)

        self._send(contents, f"query.{QUERY_ACTION}", inst.server_round, nonce, take)
        if nxt is not None and nxt.server is not None:
            self._route(nxt, outgoing)

    def _take_unmask(self, inst: _Instance, node: int, ops: Mapping[str, Any]) -> None:
        assert inst.server is not None
        if int(ops.get("unmask-instance", -1)) != inst.k:
            self._exclude(inst.server_round, node, "wrong-step", "no unmasking shares")
            return
        try:
            shares = {}
            for kind in ("b", "sk"):
                peers = [int(v) for v in ops.get(f"unmask-{kind}-peers", [])]
                data = [bytes(v) for v in ops.get(f"unmask-{kind}", [])]
                if len(peers) != len(data):
                    raise FedradError("malformed", "the unmasking shares are ragged")
                shares[kind] = dict(zip(peers, data, strict=True))
            inst.server.add_unmask_shares(inst.index[node], shares)
        except FedradError as e:
            self._exclude(inst.server_round, node, e.code, e.message)

    def _finish(self, inst: _Instance, arrays: ArrayRecord) -> ArrayRecord:
        """Unmask ``inst`` and apply its result; on failure keep ``arrays``."""
        if inst.server is None:
            if inst.kind == "train":
                log.warning("round %d: no secure training result; the global model is kept "
                            "unchanged", inst.server_round)
            return arrays
        try:
            result = inst.server.unmask(dtype=np.float64)
        except FedradError as e:
            self._fail(inst, f"[{e.code}] {e.message}")
            return arrays
        finally:
            inst.server = None
            self.instances.pop(inst.k - 2, None)
        s = self.settings
        if inst.kind == "train":
            new, loss = vector_to_update(result.values, self._reference)
            if self.server_step is not None:
                new = self.server_step(self._reference, new)
            total = result.weight_sum * inst.total_weight
            self.train_metrics[inst.server_round] = {
                "num-examples": float(round(total)), "train-loss": loss,
                "sites": float(len(result.survivors)), "error-bound": result.error_bound}
            log.info("round %d: secure weighted mean of %d sites (%d dropped), %d samples, loss "
                     "%.4f, quantisation bound %.2e", inst.server_round, len(result.survivors),
                     len(result.dropped), round(total), loss, result.error_bound)
            return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in new.items()})
        metrics = vector_to_counts(result.values, num_classes=s.num_classes, bins=s.score_bins)
        try:
            counts = counts_from_metrics(metrics)
        except FedradError as e:
            self._fail(inst, f"the summed evaluation counts are inconsistent: {e.message}")
            return arrays
        self._census = (float(metrics["train-examples"]),
                        {inst.node_of(i) for i in result.survivors})
        self.on_pooled(inst.server_round, pooled_metrics(counts, class_names=s.classes),
                       counts.n)
        return arrays

