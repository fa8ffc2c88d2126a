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

import numpy as np

from edgeft.aggregate import RoundContext
from edgeft.errors import EdgeftError, Rejected, SecAggError
from edgeft.secagg import SecAggServer, threshold_for
from edgeft.secagg.fixedpoint import ring_bits_for
from edgeft.secagg.protocol import MaskedInput, PublicKeys, SharedKeys, UnmaskShares
from edgeft.secagg.updates import SecAggSettings, decode_sum, round_context, vector_length
from edgeft.server.rounds import RoundKind

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


class SecureRounds(RoundKind):
    """The secure aggregation round kind: devices take part in the protocol instead of uploading; the round
    closes when the protocol unmasks the sum, and fails (nothing unmasked) below the threshold."""

    def __init__(self):
        self.open_rounds: dict[tuple[str, int], SecureRound] = {}  # protocol state in this process's memory only

    def settings(self, job, selected: int) -> SecAggSettings:  # noqa: ANN001
        return round_settings(job, selected)

    def took_part(self, job, number: int, device_id: str) -> bool:  # noqa: ANN001
        ongoing = self.open_rounds.get((job.id, number))
        return ongoing is not None and (device_id in ongoing.server.keys or ongoing.server.phase != "advertise")

    def check(self, rounds, job, header, update, capabilities) -> None:  # noqa: ANN001
        raise Rejected(f"job {job.id!r} aggregates securely; the device takes part in SecureAggregate instead",
                       reason="secure_aggregation")

    def close(self, rounds, job, row, count: int, deadline_passed: bool) -> None:  # noqa: ANN001
        """The round's deadline ends the first phase; later phases end at their own deadlines (``tick``)."""
        if deadline_passed:
            secure = self.round(rounds, job, row)
            if secure.server.phase == "advertise":
                self._advance(rounds, job, row.number, secure)

    def tick(self, rounds) -> None:  # noqa: ANN001
        for (job_id, number), secure in list(self.open_rounds.items()):
            if secure.expired() and secure.server.phase != "advertise":  # the first phase: the round's deadline
                self._advance(rounds, rounds.job_configs[job_id], number, secure)

    def round(self, rounds, job, row) -> SecureRound:  # noqa: ANN001
        """The protocol state of open round ``row``, set up on first use (under the rounds' lock)."""
        key = (job.id, row.number)
        if key not in self.open_rounds:
            template = rounds.global_adapter(job.id, row.number - 1)
            self.open_rounds[key] = SecureRound.open(job, row.number, list(row.selected), template, row.deadline)
        return self.open_rounds[key]

    def ring_dtype(self, job_id: str, number: int) -> np.dtype | None:
        """The ring element type of secure round ``number`` (None: no such secure round in progress)."""
        secure = self.open_rounds.get((job_id, number))
        return secure.settings.codec.dtype if secure is not None else None

    def step(self, rounds, job, header, step) -> object:  # noqa: ANN001
        """Take a device's message for the current phase; returns the phase's answer for it when ready (else
        None: ask again with ``answer``). SecAggError when the device's part in the round is over."""
        with rounds.lock:
            rounds.state.seen(header.device_id, job.id)
            row = rounds.state.round(job.id, header.round)
            if row is None or row.status != "open":
                why = f": {row.message}" if row is not None and row.message else ""
                raise SecAggError(f"round {header.round} of job {job.id!r} is not open"
                                  f"{' (' + row.status + ')' if row is not None else ''}{why}", reason="round")
            if header.device_id not in row.selected:
                raise Rejected(f"device {header.device_id} was not selected for round {header.round}",
                               reason="not_selected")
            secure = self.round(rounds, job, row)
            try:
                phase = secure.receive(step)
            except SecAggError as exc:
                rounds.count_rejection(job.id, exc)
                raise
            if secure.server.complete() and secure.server.phase == phase:
                self._advance(rounds, job, header.round, secure)
            return self.answer(rounds, header, phase)

    def answer(self, rounds, header, phase: str) -> object:  # noqa: ANN001
        """The answer of ``phase`` for the device once the phase closed (None before)."""
        with rounds.lock:
            secure = self.open_rounds.get((header.job_id, header.round))
            if secure is None:
                row = rounds.state.round(header.job_id, header.round)
                if row is not None and row.status == "closed" and phase == "unmask":
                    return "accepted: the round closed"
                reason = f" ({row.status}: {row.message})" if row is not None else ""
                raise SecAggError(f"round {header.round} of job {header.job_id!r} has no secure aggregation in "
                                  f"progress{reason}", reason="round")
            return secure.answer(phase, header.device_id)

    def _advance(self, rounds, job, number: int, secure: SecureRound) -> None:  # noqa: ANN001
        """Close the current phase; on the last one, aggregate and close the round; below the threshold, fail
        the round (nothing unmasked, nothing stored but the reason)."""
        phase = secure.server.phase
        try:
            answer = secure.server.advance()
        except SecAggError as exc:
            self.open_rounds.pop((job.id, number), None)
            rounds.fail(job, number, f"round {number}: {exc}")
            return
        secure.deadline = time.time() + job.secure_aggregation.phase_timeout_s
        if phase != "unmask":
            secure.answers[phase] = answer
            return
        self.open_rounds.pop((job.id, number), None)
        self._close(rounds, job, number, secure, answer)

    def _close(self, rounds, job, number: int, secure: SecureRound, total: np.ndarray) -> None:  # noqa: ANN001
        """Decode the unmasked sum into the summed delta and hand it to the job's strategy; store the round."""
        started = time.perf_counter()
        server, settings = secure.server, secure.settings
        try:
            selected = rounds.state.round(job.id, number).selected
            template = rounds.global_adapter(job.id, number - 1)
            summed, weight = decode_sum(total, settings, template)
            context = RoundContext(round=number, selected=len(selected),
                                   state=rounds.strategy_state(job.id, number - 1))
            aggregation = rounds.strategies[job.id].start_secure(template, context)
            aggregation.add_sum(summed, float(weight), len(server.u3))
            blob = rounds.artifacts.put_tensors(aggregation.result())
        except EdgeftError as exc:
            rounds.fail(job, number, f"round {number}: the unmasked sum could not be aggregated: {exc}")
            return
        report = aggregation.report()
        report["secure_aggregation"] = {
            "selected": len(selected), "threshold": settings.threshold, "advertised": len(server.u1),
            "shared_keys": len(server.u2), "survivors": list(server.u3), "dropped_after_sharing":
                sorted(set(server.u2) - set(server.u3)), "bits": settings.bits, "clip": settings.clip,
            "ring_bits": settings.ring_bits, "step": settings.codec.step, "total_weight": weight}
        rounds.store(job, number, blob, aggregation.state(), report, started)
