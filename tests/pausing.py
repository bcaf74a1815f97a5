"""Strategies that stop in the middle of one round, so a test can kill the server there (or see it crash).

They pause in ``apply`` of ``pause_round``: after the round's replies were
received and logged, before its step is taken and the round is logged. The
pause happens once: it writes ``marker`` first, and a run that finds the
marker does not pause (the resumed run, the uninterrupted reference).
:class:`CrashingFedAvg` raises there instead, once, ending the run in process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fedslim.channel.updates import ClientUpdate
from fedslim.strategies.base import FastStrategy, Outcome
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.strategies.fedvarp import FedVARP

PAUSE_S = 120.0


class PausingMixin(FastStrategy):
    pause_round: int
    marker: str

    def apply(self, server_round: int, updates: list[ClientUpdate]) -> Outcome:
        if server_round == self.pause_round and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(PAUSE_S)
        return super().apply(server_round, updates)


class PausingFedAvg(PausingMixin, FastFedAvg):
    def __init__(self, pause_round: int = 0, marker: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pause_round, self.marker = pause_round, marker


class PausingFedVARP(PausingMixin, FedVARP):
    def __init__(self, pause_round: int = 0, marker: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pause_round, self.marker = pause_round, marker


class ServerCrash(RuntimeError):
    """What :class:`CrashingFedAvg` raises in the middle of its round."""


class CrashingFedAvg(FastFedAvg):
    def __init__(self, pause_round: int = 0, marker: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pause_round, self.marker = pause_round, marker

    def apply(self, server_round: int, updates: list[ClientUpdate]) -> Outcome:
        if server_round == self.pause_round and not Path(self.marker).exists():
            Path(self.marker).write_text("crashed")
            raise ServerCrash(f"crash in round {server_round}")
        return super().apply(server_round, updates)
