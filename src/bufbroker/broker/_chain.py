"""Requests that use what an earlier request of the same connection made: ``{"ref": id}``.

A client may send ``attach {"buffer": {"ref": 1}}`` right behind request 1 (an import, say)
and ``map {"attachment": {"ref": 2}}`` behind that, without waiting for either reply: from a
received handle to mapped memory in one round trip. References are resolved in request order,
against what each earlier request made (a buffer for allocate, open, import and export_memfd;
an attachment for attach); if that request failed, the one that refers to it fails with
ECANCELED. A request that refers to one still unanswered (an open waiting for its name) is
answered after it, in order.

Plain bookkeeping, no I/O. What is remembered is bounded: the last MADE requests that made
something, and the requests waiting behind others count against max_pending_requests.
"""

from __future__ import annotations

import errno
from collections import OrderedDict

from .. import protocol as p
from ..protocol import BrokerError

__all__ = ["MADE", "Chain"]

MADE = 1024  # requests whose product a later request may still refer to

_FIELDS = ("buffer", "attachment")
_MAKES = {
    p.Allocate: "id",
    p.Open: "id",
    p.Import: "id",
    p.ExportMemfd: "id",
    p.Export: "id",
    p.Attach: "attachment",
}


def _ref(args: p.OpArgs) -> tuple[str, p.Ref] | None:
    for field in _FIELDS:
        value = args.__dict__.get(field)
        if type(value) is p.Ref:
            return field, value
    return None


class Chain:
    def __init__(self) -> None:
        self._made: OrderedDict[int, int | None] = OrderedDict()  # request id → what it made
        self._unanswered: dict[int, list[p.Request]] = {}  # request id → requests waiting on it

    def blocker(self, args: p.OpArgs) -> int | None:
        """The id of a request still unanswered that ``args`` refers to, if any."""
        found = _ref(args)
        if found is not None and found[1].request in self._unanswered:
            return found[1].request
        return None

    def unanswered(self, id: int) -> None:
        """Request ``id`` is answered later (it waits): requests that refer to it wait too."""
        self._unanswered.setdefault(id, [])

    def wait(self, request: p.Request, on: int) -> None:
        """Answer ``request`` after request ``on``."""
        self._unanswered[on].append(request)
        self.unanswered(request.id)

    def resolve(self, args: p.OpArgs) -> p.OpArgs:
        """``args`` with its reference replaced by what the request it names made."""
        found = _ref(args)
        if found is None:
            return args
        field, ref = found
        if ref.request not in self._made:
            raise BrokerError(
                errno.EINVAL, f"{field}: request {ref.request} made nothing this connection remembers"
            )
        made = self._made[ref.request]
        if made is None:
            raise BrokerError(errno.ECANCELED, f"{field}: request {ref.request} failed")
        return type(args)(**{**args.__dict__, field: made})

    def answered(self, request: p.Request, result: object) -> None:
        """Note what ``request`` made (``result``: its result, or None if it failed)."""
        key = _MAKES.get(type(request.args))
        if key is not None:
            self._made[request.id] = result[key] if isinstance(result, dict) else None
            self._made.move_to_end(request.id)
            if len(self._made) > MADE:
                self._made.popitem(last=False)

    def take(self, id: int) -> list[p.Request]:
        """The requests that waited for request ``id``, now answered: answer them, in order."""
        return self._unanswered.pop(id, [])
