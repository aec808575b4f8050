"""The SecAgg+ protocol as two plain-Python state machines, one per client, one server.

One round, in the order Flower's messages will carry it (``u`` a client, ``S`` the server)::

    u.advertise_keys()                 -> public keys          -> S.collect_keys(...)
    S.collect_keys(...)                -> all public keys      -> u.share_keys(...)
    u.share_keys(...)                  -> encrypted shares     -> S.route_shares(...)
    S.route_shares(...)[u]             -> shares for u         -> u.receive_shares(...)
    u.masked_input(vector, weight)     -> masked uint32 vector -> S.add_masked_input(u, ...)
    S.unmask_request()                 -> (survivors, dropped) -> u.unmask_shares(...)
    u.unmask_shares(...)               -> shares               -> S.add_unmask_shares(u, ...)
    S.unmask()                         -> weighted mean (or sum) of the survivors' vectors

Each client makes two fresh X25519 key pairs per round: ``c`` keys encrypt the shares sent
through the server (ChaCha20-Poly1305 with a key from the pairwise agreement; the server
cannot read or alter them), ``s`` keys agree on the pairwise mask seeds.  Each client draws a
private self-mask secret ``b_u`` and Shamir-shares both ``b_u`` and its ``s`` private key
among its neighbours and itself with threshold ``t``.  Its masked input is its encoded vector
plus its self mask plus/minus one mask per neighbour that shared keys (``u < v`` adds,
``u > v`` subtracts, see :mod:`.masks`).  At unmasking, every survivor gives the server its
shares of the survivors' ``b`` (to remove their self masks) and of the dropped clients' ``s``
keys (to remove the dropped clients' pairwise masks with the survivors), never both for the
same peer: so the server can never remove both masks of any one client and never sees an
individual input, even of a client it wrongly calls dropped.

``degree`` (SecAgg+) restricts each client's neighbours to a Harary graph of that even
degree over the sorted node ids; ``None`` means every other client (plain SecAgg).

Security assumes an honest-but-curious server and fewer than ``t`` colluding clients in any
neighbourhood; ``t`` should exceed half the neighbourhood (``degree + 1``).  A client refuses
to reveal both secrets of a peer across its own requests, but an actively malicious server
that tells different clients different survivor lists is not detected: that needs SecAgg's
signed consistency round, which is not implemented.  Parameters
(``SecAggParams``) are public and must be identical at the server and every client.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import FedradError
from . import shamir
from .encoding import (
    check_headroom,
    encode_into,
    sum_error_bound,
    weighted_mean_error_bound,
)
from .masks import (
    apply_masks,
    derive_key,
    load_public_key,
    mask_word,
    mask_workers,
    pairwise_seed,
    self_mask_seed,
)

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_SCALE_BITS",
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "neighbours",
]

logger = logging.getLogger(__name__)

#: Default clipping bound of encoded values (model weights and updates are far smaller).
DEFAULT_CLIP = 8.0
#: Default fractional bits: 8 * 2**27 = 2**30 leaves headroom for weighted sums.
DEFAULT_SCALE_BITS = 27
_NONCE = 12
_MAX_NODE_ID = 2**63


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure-aggregation round (identical everywhere).

    Attributes
    ----------
    threshold:
        Shares needed to reconstruct a secret (``t``); the round survives up to
        ``neighbourhood - t`` dropouts after masking.
    round_id:
        Round number, bound into every derived key so masks never repeat across rounds.
    clip, scale_bits:
        Fixed-point encoding (see :mod:`.encoding`); ``clip >= 1`` when weighted.
    degree:
        Neighbours per client (even), or ``None`` for all clients.
    weighted:
        True: inputs carry a weight share and the result is the weighted mean.
        False: plain sum (evaluation counts).
    """

    threshold: int
    round_id: int = 0
    clip: float = DEFAULT_CLIP
    scale_bits: int = DEFAULT_SCALE_BITS
    degree: int | None = None
    weighted: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or self.threshold < 2:
            raise FedradError(
                "bad-config", f"threshold must be an integer >= 2, got {self.threshold}"
            )
        if self.degree is not None and (self.degree < 2 or self.degree % 2):
            raise FedradError(
                "bad-config", f"degree must be an even number >= 2, got {self.degree}"
            )
        if self.degree is not None and self.threshold > self.degree + 1:
            raise FedradError(
                "bad-config",
                f"threshold {self.threshold} exceeds the neighbourhood size {self.degree + 1}",
            )
        if self.weighted and not self.clip >= 1:
            raise FedradError("bad-config", "weighted aggregation needs clip >= 1")
        if not 0 <= self.round_id < 2**64:
            raise FedradError("bad-config", "round_id must be in [0, 2**64)")
        check_headroom(2, clip=self.clip, scale_bits=self.scale_bits, weighted=self.weighted)


@dataclass(frozen=True)
class SecAggResult:
    """What :meth:`SecAggServer.unmask` returns.

    ``values`` is the weighted mean (``weighted=True``) or the sum, as float64;
    ``weight_sum`` the survivors' summed weight shares (``nan`` for a plain sum);
    ``error_bound`` the per-element quantisation bound of ``values`` (clipping aside).
    """

    values: np.ndarray
    weight_sum: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float


def neighbours(node_id: int, node_ids: Iterable[int], degree: int | None) -> list[int]:
    """The neighbours of ``node_id`` in the Harary graph of ``degree`` over sorted ids."""
    ids = sorted(set(node_ids))
    if node_id not in ids:
        raise FedradError("bad-peer", f"node {node_id} is not in the round's node list")
    n = len(ids)
    if degree is None or degree >= n - 1:
        return [v for v in ids if v != node_id]
    i = ids.index(node_id)
    half = degree // 2
    found = {ids[(i + d) % n] for d in range(1, half + 1)}
    found |= {ids[(i - d) % n] for d in range(1, half + 1)}
    return sorted(found)


def _check_node_id(node_id: int) -> int:
    if isinstance(node_id, bool) or not isinstance(node_id, int | np.integer):
        raise FedradError("bad-peer", "node ids must be positive integers")
    node_id = int(node_id)
    if not 0 < node_id < _MAX_NODE_ID:
        raise FedradError("bad-peer", f"node id {node_id} is outside [1, 2**63)")
    return node_id


def _aad(round_id: int, sender: int, recipient: int) -> bytes:
    return b"fedrad-secagg-v1|share|" + b"".join(
        int(v).to_bytes(8, "big") for v in (round_id, sender, recipient)
    )


class SecAggClient:
    """One site's side of a SecAgg+ round (a new object per round).

    Parameters
    ----------
    node_id:
        This node's id (positive; Flower's node id).
    params:
        The round's public :class:`SecAggParams`.
    """

    def __init__(self, node_id: int, params: SecAggParams) -> None:
        self.node_id = _check_node_id(node_id)
        self.params = params
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._stage = "advertise"
        self._public: dict[int, tuple[bytes, bytes]] = {}
        self._neighbours: list[int] = []
        self._b: bytes | None = None
        self._own_share: tuple[int, int] | None = None
        self._held: dict[int, tuple[int, int]] = {}  # peer -> (sk share y, b share y)
        self._revealed: dict[int, str] = {}
        self.clipped = 0  # values clipped in the last masked input (stays local)

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise FedradError(
                "bad-stage",
                f"secure aggregation step called out of order: expected {stage!r}, "
                f"the client is at {self._stage!r}",
            )

    @property
    def stage(self) -> str:
        """The next stage this client accepts (``advertise``, ``share``, ... ``unmask``)."""
        return self._stage

    def bind(self, node_id: int, params: SecAggParams) -> None:
        """Set the round's node id and parameters after :meth:`advertise_keys`.

        Keys can be advertised before the cohort (and so each node's id in it and the
        threshold) is known; this fixes them before :meth:`share_keys`.
        """
        self._expect("share")
        self.node_id = _check_node_id(node_id)
        self.params = params

    def export_state(self) -> dict[str, Any]:
        """This client's whole state as JSON-safe values (private keys as hex).

        For clients that run each stage in a fresh process (Flower's deployment mode):
        store it locally between stages; it holds secrets and must never leave the site.
        """
        p = self.params
        return {
            "node_id": self.node_id,
            "params": {
                "threshold": p.threshold, "round_id": p.round_id, "clip": p.clip,
                "scale_bits": p.scale_bits, "degree": p.degree, "weighted": p.weighted,
            },
            "c_sk": self._c_sk.private_bytes_raw().hex(),
            "s_sk": self._s_sk.private_bytes_raw().hex(),
            "stage": self._stage,
            "public": {str(k): [c.hex(), s_.hex()] for k, (c, s_) in self._public.items()},
            "neighbours": list(self._neighbours),
            "b": self._b.hex() if self._b is not None else None,
            "own_share": [str(v) for v in self._own_share] if self._own_share else None,
            "held": {str(k): [str(a), str(b)] for k, (a, b) in self._held.items()},
            "revealed": {str(k): v for k, v in self._revealed.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output."""
        try:
            client = cls.__new__(cls)
            client.node_id = _check_node_id(int(state["node_id"]))
            client.params = SecAggParams(**state["params"])
            client._c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["c_sk"]))
            client._s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["s_sk"]))
            client._stage = str(state["stage"])
            client._public = {
                int(k): (bytes.fromhex(c), bytes.fromhex(s_))
                for k, (c, s_) in state["public"].items()
            }
            client._neighbours = [int(v) for v in state["neighbours"]]
            client._b = bytes.fromhex(state["b"]) if state["b"] is not None else None
            own = state["own_share"]
            client._own_share = (int(own[0]), int(own[1])) if own else None
            client._held = {int(k): (int(a), int(b)) for k, (a, b) in state["held"].items()}
            client._revealed = {int(k): str(v) for k, v in state["revealed"].items()}
            client.clipped = 0
        except (KeyError, TypeError, ValueError) as e:
            raise FedradError(
                "bad-state",
                "the stored secure-aggregation state is unreadable; the site takes no part "
                "in this round and rejoins with fresh keys in the next",
            ) from e
        return client

    def advertise_keys(self) -> dict[str, bytes]:
        """Stage 1: this round's two public keys, ``{"c_pk": ..., "s_pk": ...}``."""
        self._expect("advertise")
        self._stage = "share"
        return {
            "c_pk": self._c_sk.public_key().public_bytes_raw(),
            "s_pk": self._s_sk.public_key().public_bytes_raw(),
        }

    def share_keys(self, public_keys: Mapping[int, Mapping[str, bytes]]) -> dict[int, bytes]:
        """Stage 2: Shamir-share ``b_u`` and the mask key; one ciphertext per neighbour.

        ``public_keys`` is the server's broadcast ``{node_id: {"c_pk", "s_pk"}}``.
        """
        self._expect("share")
        keys = {_check_node_id(k): v for k, v in public_keys.items()}
        own = keys.get(self.node_id)
        if (
            own is None
            or own.get("s_pk") != self._s_sk.public_key().public_bytes_raw()
            or (own.get("c_pk") != self._c_sk.public_key().public_bytes_raw())
        ):
            raise FedradError("bad-peer", "the key list does not hold this node's own keys")
        for node, entry in keys.items():
            for name in ("c_pk", "s_pk"):
                load_public_key(entry.get(name, b""))
            self._public[node] = (bytes(entry["c_pk"]), bytes(entry["s_pk"]))
        if len({k for pair in self._public.values() for k in pair}) != 2 * len(self._public):
            raise FedradError("bad-key", "two nodes in the key list share a public key")
        self._neighbours = neighbours(self.node_id, keys, self.params.degree)
        holders = [self.node_id, *self._neighbours]
        if len(holders) < self.params.threshold:
            raise FedradError(
                "too-many-dropouts",
                f"only {len(holders)} clients in this node's neighbourhood, "
                f"threshold is {self.params.threshold}",
            )
        self._b = os.urandom(32)
        sk_shares = shamir.share_secret(
            self._s_sk.private_bytes_raw(), holders, self.params.threshold
        )
        b_shares = shamir.share_secret(self._b, holders, self.params.threshold)
        self._own_share = (sk_shares[self.node_id], b_shares[self.node_id])
        out: dict[int, bytes] = {}
        for v in self._neighbours:
            plaintext = shamir.share_to_bytes(sk_shares[v]) + shamir.share_to_bytes(b_shares[v])
            nonce = os.urandom(_NONCE)
            aead = ChaCha20Poly1305(self._channel_key(v))
            out[v] = nonce + aead.encrypt(
                nonce, plaintext, _aad(self.params.round_id, self.node_id, v)
            )
        self._stage = "receive"
        return out

    def _channel_key(self, peer: int) -> bytes:
        shared = self._c_sk.exchange(load_public_key(self._public[peer][0]))
        lo, hi = sorted((self.node_id, peer))
        return derive_key(shared, b"share-channel", self.params.round_id, lo, hi)

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Stage 3: decrypt the shares neighbours sent; those senders are masked with."""
        self._expect("receive")
        held: dict[int, tuple[int, int]] = {}
        for sender, ct in ciphertexts.items():
            sender = _check_node_id(sender)
            if sender not in self._neighbours:
                raise FedradError("bad-peer", f"node {sender} is not a neighbour of this node")
            if not isinstance(ct, bytes | bytearray) or len(ct) != (
                _NONCE + 2 * shamir.SHARE_BYTES + 16
            ):
                raise FedradError("bad-share", f"the share from node {sender} has a wrong length")
            try:
                plain = ChaCha20Poly1305(self._channel_key(sender)).decrypt(
                    bytes(ct[:_NONCE]),
                    bytes(ct[_NONCE:]),
                    _aad(self.params.round_id, sender, self.node_id),
                )
            except InvalidTag as e:
                raise FedradError(
                    "bad-share", f"the share from node {sender} failed authentication"
                ) from e
            held[sender] = (
                shamir.share_from_bytes(plain[: shamir.SHARE_BYTES]),
                shamir.share_from_bytes(plain[shamir.SHARE_BYTES :]),
            )
        if len(held) + 1 < self.params.threshold:
            raise FedradError(
                "too-many-dropouts",
                f"only {len(held)} neighbours shared keys; threshold is {self.params.threshold}",
            )
        self._held = held
        self._stage = "mask"

    def masked_input(
        self,
        vector: np.ndarray,
        weight: float | None = None,
        *,
        total_weight: float | None = None,
    ) -> np.ndarray:
        """Stage 4: encode and mask a flat float vector.

        Parameters
        ----------
        vector:
            The whole model (or update) as one flat float array.
        weight, total_weight:
            Weighted rounds: this site's weight (sample count) and the round's public
            normaliser (sum of the cohort's sample counts, or an upper bound); the
            vector is scaled by ``weight / total_weight`` and that share is appended as
            one extra element.  Unweighted rounds: leave both ``None``.

        Returns
        -------
        numpy.ndarray
            ``uint32``, ``len(vector) + 1`` elements when weighted, else ``len(vector)``.
        """
        self._expect("mask")
        vec = np.asarray(vector)
        if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.floating):
            raise FedradError(
                "bad-input", f"expected a flat float vector, got {vec.dtype} {vec.shape}"
            )
        p = self.params
        if p.weighted:
            if weight is None or total_weight is None:
                raise FedradError("bad-weight", "a weighted round needs weight and total_weight")
            if not (math.isfinite(weight) and math.isfinite(total_weight)) or not (
                0 < weight <= total_weight
            ):
                raise FedradError(
                    "bad-weight",
                    f"weight must be in (0, total_weight]; got {weight} of {total_weight}",
                )
            factor = float(weight) / float(total_weight)
        elif weight is not None or total_weight is not None:
            raise FedradError("bad-weight", "this round is unweighted: pass no weight")
        else:
            factor = 1.0
        n = vec.shape[0]
        out = np.empty(n + 1 if p.weighted else n, np.uint32)
        work = np.empty(1 << 16, np.float64)
        clipped = [0]
        scale = 2.0**p.scale_bits

        def fill(start: int, stop: int, chunk: np.ndarray) -> None:
            end = min(stop, n)
            if end > start:
                clipped[0] += encode_into(
                    chunk[: end - start],
                    vec[start:end],
                    clip=p.clip,
                    scale_bits=p.scale_bits,
                    factor=factor,
                    work=work,
                )
            if stop > n:  # the weight share, last element
                chunk[-1:].view(np.int32)[0] = int(round(factor * scale))

        add = [self_mask_seed(self._b or b"", p.round_id, self.node_id)]
        sub: list[bytes] = []
        for v in self._held:
            seed = pairwise_seed(self._s_sk, self._public[v][1], p.round_id, self.node_id, v)
            (add if self.node_id < v else sub).append(seed)
        apply_masks(out, add=add, subtract=sub, fill=fill)
        self.clipped = clipped[0]
        if self.clipped:
            logger.info("secure aggregation: %s values clipped to +-%s", self.clipped, p.clip)
        self._stage = "unmask"
        return out

    def unmask_shares(
        self, survivors: Iterable[int], dropped: Iterable[int]
    ) -> dict[str, dict[int, bytes]]:
        """Stage 5: shares of survivors' ``b`` and dropped clients' mask keys.

        Returns ``{"b": {peer: share}, "sk": {peer: share}}`` for the peers this node holds
        shares of.  Refuses (``double-reveal``) a peer listed as both, or listed in the
        other role than in an earlier call: the server never gets both of one peer's
        secrets from this node.
        """
        self._expect("unmask")
        surv = {_check_node_id(v) for v in survivors}
        drop = {_check_node_id(v) for v in dropped}
        if surv & drop:
            raise FedradError(
                "double-reveal", "a node is listed as both survivor and dropped; refusing"
            )
        if self.node_id not in surv:
            raise FedradError("bad-peer", "this node sent its input but is not listed a survivor")
        if len(surv) < self.params.threshold:
            raise FedradError(
                "too-many-dropouts",
                f"{len(surv)} survivors is below the threshold {self.params.threshold}",
            )
        held = dict(self._held)
        if self._own_share is not None:
            held[self.node_id] = self._own_share
        for peer in (surv | drop) & held.keys():
            kind = "b" if peer in surv else "sk"
            if self._revealed.get(peer, kind) != kind:
                raise FedradError(
                    "double-reveal",
                    f"node {peer} was reported in the other role before; refusing to reveal "
                    "both of its secrets",
                )
        out: dict[str, dict[int, bytes]] = {"b": {}, "sk": {}}
        for peer in sorted((surv | drop) & held.keys()):
            kind = "b" if peer in surv else "sk"
            self._revealed[peer] = kind
            y = held[peer][1] if kind == "b" else held[peer][0]
            out[kind][peer] = shamir.share_to_bytes(y)
        return out


class SecAggServer:
    """The server's side of a SecAgg+ round (a new object per round).

    Parameters
    ----------
    params:
        The round's public :class:`SecAggParams`.
    vector_length:
        Length of the clients' float vectors (before the weight element).
    """

    def __init__(self, params: SecAggParams, *, vector_length: int) -> None:
        if vector_length < 1:
            raise FedradError("bad-config", "vector_length must be positive")
        self.params = params
        self.vector_length = int(vector_length)
        self._stage = "keys"
        self._keys: dict[int, dict[str, bytes]] = {}
        self._neigh: dict[int, list[int]] = {}
        self._pairs: dict[int, set[int]] = {}  # u -> peers u and v exchanged shares with
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._acc: np.ndarray | None = None
        self._shares_b: dict[int, dict[int, int]] = {}
        self._shares_sk: dict[int, dict[int, int]] = {}
        self._responded: set[int] = set()

    @property
    def input_length(self) -> int:
        """Length of each masked input (``vector_length + 1`` when weighted)."""
        return self.vector_length + (1 if self.params.weighted else 0)

    def _expect(self, *stages: str) -> None:
        if self._stage not in stages:
            raise FedradError(
                "bad-stage",
                f"secure aggregation step called out of order: the server is at "
                f"{self._stage!r}, expected {' or '.join(stages)}",
            )

    def _fail(self, message: str, code: str = "too-many-dropouts") -> FedradError:
        self._acc = None  # never reveal a partial sum
        self._stage = "failed"
        return FedradError(code, message)

    def collect_keys(
        self, adverts: Mapping[int, Mapping[str, bytes]]
    ) -> dict[int, dict[str, bytes]]:
        """Stage 1: check the advertised keys; return the list to broadcast to all clients."""
        self._expect("keys")
        seen: set[bytes] = set()
        for node, entry in adverts.items():
            node = _check_node_id(node)
            pair = {name: bytes(entry.get(name, b"")) for name in ("c_pk", "s_pk")}
            for key in pair.values():
                load_public_key(key)
                if key in seen:
                    raise FedradError("bad-key", f"node {node} reuses a public key")
                seen.add(key)
            self._keys[node] = pair
        if len(self._keys) < self.params.threshold:
            raise self._fail(
                f"{len(self._keys)} clients advertised keys; threshold is {self.params.threshold}"
            )
        check_headroom(
            len(self._keys),
            clip=self.params.clip,
            scale_bits=self.params.scale_bits,
            weighted=self.params.weighted,
        )
        self._neigh = {u: neighbours(u, self._keys, self.params.degree) for u in self._keys}
        self._stage = "shares"
        return {u: dict(v) for u, v in self._keys.items()}

    def route_shares(
        self, outgoing: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: forward each client's encrypted shares; returns ``{recipient: {sender: ct}}``.

        The senders form the set of clients that take part in masking.
        """
        self._expect("shares")
        senders = {_check_node_id(u) for u in outgoing} & self._keys.keys()
        if senders != {int(u) for u in outgoing}:
            raise FedradError("bad-peer", "shares came from a node that advertised no keys")
        sent: dict[tuple[int, int], bytes] = {}
        for u, cts in outgoing.items():
            for v, ct in cts.items():
                v = _check_node_id(v)
                if v not in self._neigh[int(u)]:
                    raise FedradError("bad-peer", f"node {u} sent a share to a non-neighbour")
                sent[(int(u), v)] = bytes(ct)
        # deliver a pair's shares only in both directions, so that both mask with each other
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in senders}
        self._pairs = {u: set() for u in senders}
        for (u, v), ct in sent.items():
            if (v, u) in sent:
                inbox[v][u] = ct
                self._pairs[u].add(v)
        if len(senders) < self.params.threshold:
            raise self._fail(
                f"{len(senders)} clients shared keys; threshold is {self.params.threshold}"
            )
        self._u2 = senders
        self._stage = "inputs"
        return inbox

    def add_masked_input(self, node_id: int, masked: np.ndarray) -> None:
        """Stage 3: add one client's masked vector to the running sum (mod 2**32).

        A bad input (wrong dtype, shape or length, unknown sender, replay) raises a
        ``FedradError`` and is not added; that client then counts as dropped.
        """
        self._expect("inputs")
        node_id = _check_node_id(node_id)
        if node_id not in self._u2:
            raise FedradError("bad-peer", f"node {node_id} did not share keys this round")
        if node_id in self._u3:
            raise FedradError("duplicate-input", f"node {node_id} already sent its input")
        arr = np.asarray(masked)
        if arr.dtype != np.uint32 or arr.ndim != 1:
            raise FedradError(
                "bad-input", f"a masked input is a flat uint32 array, got {arr.dtype} {arr.shape}"
            )
        if arr.shape[0] != self.input_length:
            raise FedradError(
                "bad-length",
                f"node {node_id} sent {arr.shape[0]} elements, expected {self.input_length}",
            )
        if self._acc is None:
            self._acc = arr.copy()
        else:
            np.add(self._acc, arr, out=self._acc)
        self._u3.add(node_id)

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """Stage 4: close input collection; return ``(survivors, dropped)`` for the clients."""
        self._expect("inputs")
        if len(self._u3) < self.params.threshold:
            raise self._fail(
                f"only {len(self._u3)} clients sent masked inputs; at least "
                f"{self.params.threshold} are needed, the round's sum is discarded"
            )
        self._stage = "unmask"
        return sorted(self._u3), sorted(self._u2 - self._u3)

    def add_unmask_shares(self, node_id: int, shares: Mapping[str, Mapping[int, bytes]]) -> None:
        """Stage 5: store one survivor's shares (``{"b": {...}, "sk": {...}}``)."""
        self._expect("unmask")
        node_id = _check_node_id(node_id)
        if node_id not in self._u3 or node_id in self._responded:
            raise FedradError("bad-peer", f"node {node_id} may not send unmasking shares now")
        dropped = self._u2 - self._u3
        parsed: list[tuple[dict[int, dict[int, int]], int, int]] = []
        for kind, role, store in (
            ("b", self._u3, self._shares_b),
            ("sk", dropped, self._shares_sk),
        ):
            for peer, data in shares.get(kind, {}).items():
                peer = _check_node_id(peer)
                if peer not in role or (node_id != peer and node_id not in self._pairs[peer]):
                    raise FedradError(
                        "bad-share", f"node {node_id} sent a {kind} share it cannot hold"
                    )
                parsed.append((store, peer, shamir.share_from_bytes(bytes(data))))
        for store, peer, y in parsed:
            store.setdefault(peer, {})[node_id] = y
        self._responded.add(node_id)

    def unmask(self, *, dtype: type | None = None) -> SecAggResult:
        """Stage 6: remove the masks and decode; the survivors' weighted mean (or sum).

        ``dtype`` of the result defaults to float32 for a weighted mean (a model) and
        float64 for a plain sum (counts); its rounding is part of ``error_bound``.

        Raises ``FedradError("too-many-dropouts")``, discarding the masked sum, when some
        secret has fewer than ``threshold`` shares.
        """
        self._expect("unmask")
        p = self.params
        survivors = sorted(self._u3)
        dropped = sorted(self._u2 - self._u3)
        short = [u for u in survivors if len(self._shares_b.get(u, {})) < p.threshold]
        short += [u for u in dropped if len(self._shares_sk.get(u, {})) < p.threshold]
        if short:
            raise self._fail(
                f"{len(short)} clients' secrets have fewer than {p.threshold} shares after "
                "dropouts; the round's sum is discarded"
            )
        assert self._acc is not None  # unmask_request checked survivors >= threshold
        add: list[bytes] = []
        sub: list[bytes] = []
        try:
            for u in survivors:
                b_secret = shamir.combine(self._shares_b[u], p.threshold)
                sub.append(self_mask_seed(b_secret, p.round_id, u))
            dropped_keys: dict[int, X25519PrivateKey] = {}
            for u in dropped:
                raw = shamir.combine(self._shares_sk[u], p.threshold)
                dropped_keys[u] = X25519PrivateKey.from_private_bytes(raw)
        except FedradError as e:
            raise self._fail(f"a reconstructed secret is invalid: {e.message}", "bad-share") from e
        for u, sk in dropped_keys.items():
            if sk.public_key().public_bytes_raw() != self._keys[u]["s_pk"]:
                raise self._fail(
                    f"the shares of node {u}'s key do not match its public key", "bad-share"
                )
            for v in sorted(self._pairs[u]):
                if v in self._u3:  # v masked with u: v added if v < u, else subtracted
                    seed = pairwise_seed(sk, self._keys[v]["s_pk"], p.round_id, u, v)
                    (sub if v < u else add).append(seed)
        acc, self._acc = self._acc, None
        self._stage = "done"
        n = len(survivors)
        length = self.vector_length
        if dtype is None:
            dtype = np.float32 if p.weighted else np.float64
        if p.weighted:  # the weight element first, so decoding can be fused below
            word = int(acc[length])
            word += sum(mask_word(s, length) for s in add) - sum(mask_word(s, length) for s in sub)
            weight_int = word % 2**32
            weight_int -= 2**32 if weight_int >= 2**31 else 0
            weight_sum = weight_int * 2.0**-p.scale_bits
            if weight_sum <= sum_error_bound(n, scale_bits=p.scale_bits):
                raise FedradError(
                    "zero-weight", "the survivors' weights sum to zero: no weighted mean exists"
                )
            if weight_sum > 1.0 + sum_error_bound(n, scale_bits=p.scale_bits):
                raise FedradError(
                    "bad-weight",
                    "the weight shares add up to more than 1: total_weight was below the sum "
                    "of the sites' weights, so the sum may have overflowed; announce the "
                    "cohort's total sample count",
                )
            factor = 2.0**-p.scale_bits / weight_sum
            bound = weighted_mean_error_bound(
                n, clip=p.clip, scale_bits=p.scale_bits, weight_sum=weight_sum
            )
            bound += p.clip * float(np.finfo(dtype).eps)
        else:
            weight_sum = float("nan")
            factor = 2.0**-p.scale_bits
            bound = sum_error_bound(n, scale_bits=p.scale_bits)
            bound += n * p.clip * float(np.finfo(dtype).eps)
        values = np.empty(length, dtype)

        def post(start: int, stop: int, chunk: np.ndarray) -> None:
            end = min(stop, length)
            np.multiply(
                chunk[: end - start].view(np.int32),
                np.float64(factor),
                out=values[start:end],
                casting="unsafe",
            )

        # each thread removes the masks from, and decodes, its own range of the sum
        apply_masks(acc, add=add, subtract=sub, post=post, workers=mask_workers())
        logger.info(
            "secure aggregation: unmasked the sum of %s clients (%s dropped after sharing)",
            n,
            len(dropped),
        )
        return SecAggResult(values, weight_sum, tuple(survivors), tuple(dropped), bound)
