"""What the channel hands the strategy and takes from it: typed updates up, typed instructions down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedslim.channel.protocol import Role


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted train reply, as a strategy sees it.

    Parameters
    ----------
    client : str
        The client's stable key (``partition-3``, a deployment node name).
    delta : dict[str, np.ndarray]
        The decoded float32 update, one array per fast tensor.
    num_examples : int
        Local training examples the client reported.
    metrics : dict[str, float]
        Every numeric metric of the reply (``train-loss``, ...): claims, for information.
    blob : bytes
        The update as it came over the wire, for storing it in its encoded form.
    role : Role
        The work the server asked this client for (not what the reply says).
    """

    client: str
    delta: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    blob: bytes = b""
    role: Role = Role.TRAIN


@dataclass(frozen=True)
class Instruction:
    """What a strategy asks of one sampled client this round.

    Parameters
    ----------
    client : str
        The client's key.
    role : Role, optional
        The work asked for; None is plain local training, sent without a role.
    direction : mapping of str to ndarray, optional
        A fast-state-shaped tensor set the client needs for its work (FedAMD's
        global direction v for a miner), encoded with ``direction_codec``.
        Instructions of one round that share this object share its encoding.
    direction_codec : str
        Codec spec of ``direction``.
    """

    client: str
    role: Role | None = None
    direction: Mapping[str, np.ndarray] | None = field(default=None, compare=False)
    direction_codec: str = "none"

    @property
    def work(self) -> Role:
        """The role the reply answers: plain training unless told otherwise."""
        return self.role or Role.TRAIN
