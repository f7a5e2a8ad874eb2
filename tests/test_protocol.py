"""The sans-IO protocol: round trips, hostile bytes, and descriptors over a real socketpair."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import socket

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bufbroker import protocol as p
from bufbroker.protocol._ops import OpSpec


def test_every_op_round_trips_with_its_defaults() -> None:
    for name, spec in p.OPS.items():
        needed = {
            "version": 1,
            "name": "n",
            "size": 1,
            "buffer": 1,
            "attachment": 1,
            "direction": "to_device",
            "access": "read",
            "timeline": 1,
            "point": 1,
            "slots": 1,
            "stream": 1,
            "subscriber": 1,
        }
        args = {k: needed[k] for k, _, required in spec.fields if required}
        request = p.decode(msgpack.packb([0, 3, name, args]), [0] * spec.fds)
        assert isinstance(request, p.Request) and request.op == name
        again = p.decode(p.encode(request), [0] * spec.fds)
        assert again == request


def test_ops_sent_without_arguments_get_every_default() -> None:
    """Ops whose arguments all have defaults share one record for them (records are immutable)."""
    without = {name for name, spec in p.OPS.items() if spec.defaults is not None}
    assert {"ping", "import", "stats", "buffers", "devices", "export_memfd"} <= without
    for name in without:
        spec = p.OPS[name]
        request = p.decode(msgpack.packb([0, 1, name, {}]), [0] * spec.fds)
        assert isinstance(request, p.Request) and request.args == spec.args()
    with pytest.raises(p.RequestError, match="missing argument 'size'"):
        p.decode(msgpack.packb([0, 1, "allocate", {}]))


def test_replies_errors_and_events_round_trip() -> None:
    for message in (
        p.Reply(id=1, result={"x": [1, 2]}),
        p.Error(id=None, errno=errno.EPROTO, message="bad"),
        p.Error(id=4, errno=errno.EBUSY, message="busy"),
        p.Event(name="shutdown", args={}),
    ):
        assert p.decode(p.encode(message)) == message
    error = p.decode(p.encode(p.Error(id=1, errno=errno.EDQUOT, message="full")))
    assert isinstance(error, p.Error)
    exc = error.exception()
    assert isinstance(exc, OSError) and exc.errno == errno.EDQUOT and exc.code == "EDQUOT"


MAX_ID = (1 << 63) - 1
ids = st.integers(0, MAX_ID)
names = st.text(max_size=p.MAX_NAME_BYTES).map(
    lambda s: s.encode()[: p.MAX_NAME_BYTES].decode(errors="ignore")
)
constraints = st.builds(
    p.Constraints,
    max_segment_size=st.none() | st.integers(1, MAX_ID // p.PAGE_SIZE).map(lambda n: n * p.PAGE_SIZE),
    max_segments=st.none() | st.integers(1, MAX_ID),
    alignment=st.none() | st.integers(p.PAGE_SIZE.bit_length() - 1, 62).map(lambda n: 1 << n),
)
# A strategy for every annotation an op's field may have (the checks in _ops.py, read as values);
# a field's name may narrow it, as it narrows the check. A new kind of field fails loudly here.
FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "int": ids,
    "str": st.text(),
    "bool": st.booleans(),
    "float | None": st.none() | st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    "str | None": st.none() | st.text(),
    "int | None": st.none() | ids,
    "int | Ref": ids | ids.map(p.Ref),
    "Direction": st.sampled_from(p.Direction),
    "Access": st.sampled_from(p.Access),
    "Constraints": constraints,
    "tuple[int, ...]": st.lists(ids, max_size=20).map(tuple),
}
FIELD_VALUES_BY_NAME: dict[tuple[str, str], st.SearchStrategy[object]] = {
    ("name", "str"): names,
    ("name", "str | None"): st.none() | names,
}


def _op_args(spec: OpSpec) -> st.SearchStrategy[p.OpArgs]:
    """Valid arguments for ``spec``: every required field, and each optional one absent or given."""
    annotations = spec.args._annotations
    required: dict[str, st.SearchStrategy[object]] = {}
    optional: dict[str, st.SearchStrategy[object]] = {}
    for key, _, needed in spec.fields:
        kind = annotations[key]
        values = FIELD_VALUES_BY_NAME.get((key, kind), FIELD_VALUES[kind])
        (required if needed else optional)[key] = values
    return st.fixed_dictionaries(required, optional=optional).map(lambda kwargs: spec.args(**kwargs))


@pytest.mark.parametrize("op", sorted(p.OPS))
@settings(max_examples=10)
@given(data=st.data())
def test_every_op_round_trips_with_any_valid_arguments(op: str, data: st.DataObject) -> None:
    spec = p.OPS[op]
    args = data.draw(_op_args(spec), label="args")
    id = data.draw(ids, label="id")
    fds = list(range(100, 100 + spec.fds))  # decode only counts them
    request = p.Request(id=id, op=op, args=args, fds=fds)
    packet = p.encode(request)
    assert p.encode_request(id, args) == packet
    assert msgpack.unpackb(packet) == [0, id, op, args.to_wire()]
    assert p.decode(packet, fds) == request


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
results = st.dictionaries(st.text(), msgpack_values, max_size=4)


@settings(max_examples=40)
@given(
    st.builds(p.Reply, id=ids, result=results)
    | st.builds(
        p.Error, id=st.none() | ids, errno=st.sampled_from(sorted(errno.errorcode)), message=st.text()
    )
    | st.builds(p.Event, name=st.text(), args=results)
)
def test_replies_errors_and_events_round_trip_with_any_content(message: p.Message) -> None:
    packet = p.encode(message)
    assert p.decode(packet) == message
    if isinstance(message, p.Reply):
        assert p.encode_reply(message.id, message.result) == packet


@settings(max_examples=40)
@given(
    st.builds(p.Reply, id=ids, result=results)
    | st.builds(
        p.Error, id=st.none() | ids, errno=st.sampled_from(sorted(errno.errorcode)), message=st.text()
    )
    | st.builds(p.Event, name=st.text(), args=results),
    ids,
)
def test_decode_answer_takes_the_awaited_reply_and_decodes_the_rest(message: p.Message, id: int) -> None:
    """The blocking client's shortcut agrees with ``decode`` on every packet."""
    for awaited in (id, getattr(message, "id", None)):
        if awaited is None:
            continue
        result, other = p.decode_answer(p.encode(message), (), awaited)
        if isinstance(message, p.Reply) and message.id == awaited:
            assert other is None and result == message.result
        else:
            assert result is None and other == message


def test_decode_answer_does_not_take_true_for_id_1() -> None:
    packet = msgpack.packb([1, True, {"x": 1}])
    with pytest.raises(p.ProtocolError):
        p.decode_answer(packet, [], 1)  # not a reply to request 1, nor any message at all


@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_the_protocols_error(data: bytes) -> None:
    with contextlib.suppress(p.BrokerError):
        p.decode(data)
    with contextlib.suppress(p.BrokerError):
        p.decode_answer(data, [], 1)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(st.lists(values, max_size=5) | values)
def test_arbitrary_msgpack_values_raise_only_the_protocols_error(value: object) -> None:
    with contextlib.suppress(p.BrokerError):
        p.decode(msgpack.packb(value))


@given(
    kind=st.sampled_from([0, 1, 2, 3]),
    id=st.integers(0, 2**63 - 1),
    op=st.sampled_from(sorted(p.OPS)),
    args=values,
)
def test_arbitrary_requests_raise_only_the_protocols_error(kind: int, id: int, op: str, args: object) -> None:
    with contextlib.suppress(p.BrokerError):
        p.decode(msgpack.packb([kind, id, op, args]))


def test_ctrunc_closes_every_received_fd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
    a.sendmsg([b"x"], p.ancillary(fds))
    for fd in fds:
        os.close(fd)
    before = len(os.listdir("/proc/self/fd"))
    _, ancdata, flags, _ = b.recvmsg(16, p.ancillary_space(2), p.RECV_FLAGS)
    assert flags & socket.MSG_CTRUNC
    with pytest.raises(p.FdOverflow) as e:
        p.fds_from_ancillary(ancdata, flags, 2)
    assert e.value.errno == errno.ETOOMANYREFS
    assert len(os.listdir("/proc/self/fd")) == before  # the ones that fit are closed too
    a.close()
    b.close()


def test_received_fds_are_close_on_exec() -> None:
    import fcntl

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.open("/dev/null", os.O_RDONLY)
    a.sendmsg([b"x"], p.ancillary([fd]))
    _, ancdata, flags, _ = b.recvmsg(16, p.ancillary_space(4), p.RECV_FLAGS)
    [got] = p.fds_from_ancillary(ancdata, flags, 4)
    assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    for f in (fd, got):
        os.close(f)
    a.close()
    b.close()


def test_the_id_of_a_truncated_request_can_still_be_read() -> None:
    data = msgpack.packb([0, 77, "ping", {"pad": "x" * 100}])
    assert p.peek_request_id(data[:20]) == 77
    assert p.peek_request_id(b"\xc1") is None


@pytest.mark.parametrize(
    "error",
    [
        p.BrokerError(errno.EBUSY, "attached"),
        p.ProtocolError("not msgpack"),
        p.RequestError(7, p.BrokerError(errno.EINVAL, "bad size")),
        p.BrokerUnavailable("/run/bufbroker/bufbroker.sock"),
    ],
)
def test_errors_survive_pickling(error: p.BrokerError) -> None:
    """As OSErrors do: across multiprocessing, or a process pool's results."""
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert (again.errno, again.strerror) == (error.errno, error.strerror)
    assert getattr(again, "id", None) == getattr(error, "id", None)
