"""Secure aggregation's messages (``edgeft.secagg``): a round's settings, the devices' phase messages and the
coordinator's answers."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from edgeft import secagg
from edgeft.errors import WireError
from edgeft.secagg.updates import SecAggSettings
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire.types import SecAggCall, SecAggHeader


def secagg_settings_to_pb(settings: SecAggSettings) -> pb.SecAggSettings:
    return pb.SecAggSettings(bits=settings.bits, clip=settings.clip, ring_bits=settings.ring_bits,
                             threshold=settings.threshold, weighted=settings.weighted,
                             max_weight=settings.max_weight, clip_norm=settings.clip_norm or 0.0)


def secagg_settings_from_pb(message: pb.SecAggSettings) -> SecAggSettings:
    """The settings of a task (ConfigError from FixedPoint for values out of range)."""
    settings = SecAggSettings(bits=message.bits, clip=message.clip, ring_bits=message.ring_bits,
                              threshold=message.threshold, weighted=message.weighted,
                              max_weight=message.max_weight or 1, clip_norm=message.clip_norm or None)
    settings.codec  # noqa: B018 - validates bits, clip and ring_bits
    return settings


SecAggStep = secagg.PublicKeys | secagg.SharedKeys | secagg.MaskedInput | secagg.UnmaskShares
SecAggAnswer = secagg.Roster | secagg.Inbox | secagg.Survivors | str


def _keys_pb(keys: secagg.PublicKeys) -> pb.SecAggPublicKeys:
    return pb.SecAggPublicKeys(device_id=keys.device_id, cipher_public_key=keys.cipher_public,
                               mask_public_key=keys.mask_public)


def _shares_pb(items: Iterable[secagg.EncryptedShares]) -> list[pb.SecAggEncryptedShares]:
    return [pb.SecAggEncryptedShares(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext) for s in items]


def _shares(items: Iterable[pb.SecAggEncryptedShares]) -> tuple[secagg.EncryptedShares, ...]:
    return tuple(secagg.EncryptedShares(s.sender, s.recipient, s.ciphertext) for s in items)


def secagg_request_to_pb(header: SecAggHeader, step: SecAggStep, wait_seconds: int = 0) -> pb.SecAggRequest:
    """A device's message for the current phase."""
    request = pb.SecAggRequest(job_id=header.job_id, round=header.round, device_id=header.device_id,
                               wait_seconds=wait_seconds)
    if isinstance(step, secagg.PublicKeys):
        request.advertise.CopyFrom(_keys_pb(step))
    elif isinstance(step, secagg.SharedKeys):
        request.share_keys.CopyFrom(pb.SecAggShareKeys(self_mask_commitment=step.self_mask_commitment,
                                                       shares=_shares_pb(step.shares)))
    elif isinstance(step, secagg.MaskedInput):
        data = np.ascontiguousarray(step.data, dtype=step.data.dtype.newbyteorder("<"))
        request.masked_input.CopyFrom(pb.SecAggMaskedInput(data=data.tobytes()))
    else:
        request.unmask.CopyFrom(pb.SecAggUnmask(
            self_mask_shares=[pb.SecAggShare(owner=k, share=v) for k, v in sorted(step.self_mask_shares.items())],
            mask_key_shares=[pb.SecAggShare(owner=k, share=v) for k, v in sorted(step.mask_key_shares.items())]))
    return request


def secagg_call_from_pb(request: pb.SecAggRequest) -> SecAggCall:
    """The envelope of a device's message, unchecked (``secagg_request_from_pb`` reads and checks the step)."""
    return SecAggCall(SecAggHeader(request.job_id, request.round, request.device_id), request.WhichOneof("step"),
                      request.wait_seconds)


def secagg_request_from_pb(request: pb.SecAggRequest, ring_dtype: np.dtype | None = None
                           ) -> tuple[SecAggHeader, SecAggStep]:
    """(header, step) of a device's message; ``ring_dtype`` reads a masked input (uint32 or uint64)."""
    if not (request.job_id and request.device_id):
        raise WireError("a secure aggregation request needs job_id and device_id")
    header = SecAggHeader(request.job_id, request.round, request.device_id)
    kind = request.WhichOneof("step")
    if kind == "advertise":
        k = request.advertise
        if k.device_id != request.device_id:
            raise WireError("the advertised keys name another device", reason="secagg")
        return header, secagg.PublicKeys(k.device_id, k.cipher_public_key, k.mask_public_key)
    if kind == "share_keys":
        return header, secagg.SharedKeys(request.device_id, request.share_keys.self_mask_commitment,
                                         _shares(request.share_keys.shares))
    if kind == "masked_input":
        dtype = np.dtype(ring_dtype or np.uint32).newbyteorder("<")
        raw = request.masked_input.data
        if len(raw) % dtype.itemsize:
            raise WireError(f"a masked input of {len(raw)} bytes is not a whole number of {dtype.itemsize}-byte ring "
                            "elements", reason="secagg")
        return header, secagg.MaskedInput(request.device_id,
                                          np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")))
    if kind == "unmask":
        def table(items) -> dict[str, bytes]:  # noqa: ANN001
            out = {s.owner: s.share for s in items}
            if len(out) != len(items):
                raise WireError("an unmask message repeats an owner", reason="secagg")
            return out

        return header, secagg.UnmaskShares(request.device_id, table(request.unmask.self_mask_shares),
                                           table(request.unmask.mask_key_shares))
    raise WireError("a secure aggregation request carries no step", reason="secagg")


def secagg_response_to_pb(answer: SecAggAnswer | None, retry_after_seconds: int = 1) -> pb.SecAggResponse:
    """The coordinator's answer to a phase (None: not yet; a string: the device's part is accepted)."""
    if answer is None:
        return pb.SecAggResponse(retry_after_seconds=retry_after_seconds)
    if isinstance(answer, secagg.Roster):
        return pb.SecAggResponse(roster=pb.SecAggRoster(threshold=answer.threshold,
                                                        keys=[_keys_pb(k) for k in answer.keys]))
    if isinstance(answer, secagg.Inbox):
        return pb.SecAggResponse(inbox=pb.SecAggInbox(shares=_shares_pb(answer.shares)))
    if isinstance(answer, secagg.Survivors):
        return pb.SecAggResponse(survivors=pb.SecAggSurvivors(device_ids=list(answer.devices)))
    return pb.SecAggResponse(accepted=answer)


def secagg_aborted_pb(reason: str) -> pb.SecAggResponse:
    return pb.SecAggResponse(aborted=reason)


def secagg_response_from_pb(response: pb.SecAggResponse) -> tuple[str, SecAggAnswer | int]:
    """(kind, value): ``retry_after_seconds`` (int), ``roster``, ``inbox``, ``survivors``, ``accepted`` or
    ``aborted`` (strings)."""
    kind = response.WhichOneof("outcome")
    if kind == "roster":
        keys = tuple(secagg.PublicKeys(k.device_id, k.cipher_public_key, k.mask_public_key)
                     for k in response.roster.keys)
        return kind, secagg.Roster(response.roster.threshold, keys)
    if kind == "inbox":
        return kind, secagg.Inbox(_shares(response.inbox.shares))
    if kind == "survivors":
        return kind, secagg.Survivors(tuple(response.survivors.device_ids))
    if kind in ("accepted", "aborted"):
        return kind, getattr(response, kind)
    if kind == "retry_after_seconds":
        return kind, response.retry_after_seconds
    raise WireError("a secure aggregation response carries no outcome", reason="secagg")
