"""The coordinator's side of secure aggregation rounds (``edgeft.secagg``): the protocol state of each open
secure round, in memory only.

Nothing of the protocol is ever written to the state folder: public keys, encrypted shares and masked
inputs live in this process (masked inputs only as their running sum), and the database records just the
round's outcome (the new global adapter from the unmasked sum, or the reason the round failed). So a
coordinator restart during a secure round loses that round: on start-up it is marked failed with that
reason (like any failed round, the job stops), and the stored state stays consistent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgeft.errors import SecAggError
from edgeft.secagg import SecAggServer, threshold_for
from edgeft.secagg.fixedpoint import ring_bits_for
from edgeft.secagg.protocol import PublicKeys, SharedKeys, MaskedInput, UnmaskShares
from edgeft.secagg.updates import SecAggSettings, round_context, vector_length

PHASE_OF = {PublicKeys: "advertise", SharedKeys: "share_keys", MaskedInput: "masked_input",
            UnmaskShares: "unmask"}
ORDER = ("advertise", "share_keys", "masked_input", "unmask")


def round_settings(job, selected: int) -> SecAggSettings:  # noqa: ANN001
    """The encoding of a secure round of ``job`` with ``selected`` clients: weighted by examples (FedAvg),
    or by 1 with differential privacy; a ring wide enough for the largest possible sum."""
    secure, options = job.secure_aggregation, job.strategy_options
    weighted = not options.private
    max_weight = job.max_update_examples if weighted else 1
    return SecAggSettings(bits=secure.bits, clip=secure.clip, ring_bits=ring_bits_for(secure.bits, selected * max_weight),
                          threshold=threshold_for(selected, secure.max_dropout_fraction), weighted=weighted,
                          max_weight=max_weight, clip_norm=options.clip_norm)


@dataclass
class SecureRound:
    """One open secure round: the protocol server, the round's settings, the current phase's deadline and
    the answers of the phases that closed."""

    server: SecAggServer
    settings: SecAggSettings
    deadline: float
    answers: dict[str, object] = field(default_factory=dict)

    @classmethod
    def open(cls, job, number: int, selected: list[str], template: dict, deadline: float) -> "SecureRound":  # noqa: ANN001
        settings = round_settings(job, len(selected))
        server = SecAggServer(selected, settings.threshold, vector_length(template), settings.codec.dtype,
                              round_context(job.id, number))
        return cls(server, settings, deadline)

    def receive(self, step) -> str:  # noqa: ANN001
        """Take a device's message; returns its phase. A resend for a phase that already closed is ignored."""
        phase = PHASE_OF[type(step)]
        if phase in self.answers or (phase == "unmask" and self.server.phase == "done"):
            return phase
        getattr(self.server, {"advertise": "receive_keys", "share_keys": "receive_shares",
                              "masked_input": "receive_masked", "unmask": "receive_unmask"}[phase])(step)
        return phase

    def answer(self, phase: str, device_id: str):  # noqa: ANN201
        """What ``device_id`` gets for ``phase``: None while it is open; SecAggError when the device is not part
        of the phase's outcome (it came too late) or the round aborted."""
        if self.server.aborted is not None:
            raise SecAggError(f"the secure aggregation round aborted: {self.server.aborted}", reason="aborted")
        if phase == "unmask":
            if device_id in self.server.unmasked_by() or self.server.phase == "done":
                return "accepted: the coordinator unmasks the sum once enough devices answered"
            return None
        if phase not in self.answers:
            return None
        answer = self.answers[phase]
        members = {"advertise": self.server.u1, "share_keys": self.server.u2, "masked_input": self.server.u3}[phase]
        if device_id not in members:
            raise SecAggError(f"{device_id} answered phase {phase!r} after it closed; the round goes on without it",
                              reason="late")
        return answer[device_id] if phase == "share_keys" else answer

    def expired(self) -> bool:
        return time.time() > self.deadline
