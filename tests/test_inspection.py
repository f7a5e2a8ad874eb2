"""Who sees what: a non-root caller lists its own uid's buffers and devices; root lists all."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from bufbroker import Direction

from conftest import Broker, Peer

PAGE = 4096


def test_a_user_sees_its_own_uids_objects_and_root_sees_all(
    broker: Broker, peer: Callable[..., Peer], other_uid: int
) -> None:
    with broker.connect("root-device") as dev:
        private = dev.allocate(PAGE, name="root-private")
        att = private.attach()
        mapping = att.map(Direction.TO_DEVICE)  # root's attachment, mapping and backed bytes
        shared = dev.allocate(2 * PAGE)
        handle = shared.share()
        try:
            stranger = peer("inspect_as", broker.socket, other_uid, handle, pass_fds=(handle,))
            seen = json.loads(stranger.line())
            own = seen["own"]
            assert seen["held"] == shared.id

            # The other uid: the buffer it owns and the one it holds, its own device, nothing else.
            assert {b["id"]: b["owner"] for b in seen["buffers"]} == {shared.id: 0, own: other_uid}
            assert [(d["name"], d["uid"]) for d in seen["devices"]] == [("stranger", other_uid)]
            stats = seen["stats"]
            assert stats["buffers"] == 2 and stats["bytes"] == 2 * PAGE + 3 * PAGE
            assert stats["backed_bytes"] == 0  # root's mapped buffer is not among its own
            assert stats["devices"] == 1 and stats["connections"] == 1  # root's is not counted
            assert stats["handles"] == 3  # own's, and shared's two (the creator's and ours)
            assert stats["attachments"] == 0 and stats["mappings"] == 0
            usage = {key: stats["usage"][key] for key in ("uid", "connections", "buffers", "bytes")}
            assert usage == {"uid": other_uid, "connections": 1, "buffers": 1, "bytes": 3 * PAGE}

            # Root: everything, the other uid's included.
            assert {b["id"]: b["owner"] for b in dev.buffers()} == {
                private.id: 0,
                shared.id: 0,
                own: other_uid,
            }
            assert sorted((d["name"], d["uid"]) for d in dev.devices()) == [
                ("root-device", 0),
                ("stranger", other_uid),
            ]
            stats = dev.stats()
            assert stats["buffers"] == 3 and stats["bytes"] == PAGE + 2 * PAGE + 3 * PAGE
            assert stats["backed_bytes"] == PAGE
            assert stats["devices"] == 2 and stats["connections"] == 2
            assert stats["handles"] == 4
            assert stats["attachments"] == 1 and stats["mappings"] == 1
            stranger.send("")
            stranger.finish()
        finally:
            os.close(handle)
        mapping.unmap()
        att.detach()
