"""``bufbroker streams`` against a real broker: publishers, subscribers, positions and lag."""

from __future__ import annotations

import json

from test_cli_live import ok

from bufbroker.cli._streams import STREAM_COLUMNS

from conftest import Broker


def test_streams_as_the_command_shows_them(broker: Broker) -> None:
    camera, encoding, viewing = (broker.connect(n) for n in ("camera", "encoder", "viewer"))
    with camera as dev, encoding as other, viewing as third:
        pub = dev.publish("cam0", size=6 << 20, slots=4)
        encoder = other.subscribe("cam0")
        for _ in range(3):
            with pub.loan() as frame:
                frame.send(10)
        viewer = third.subscribe("cam0")
        with pub.loan() as frame:
            frame.send(10)
        for _ in range(2):
            with encoder.receive():
                pass
        with viewer.receive():
            pass

        rows = json.loads(ok(broker, "streams", "--json"))
        assert len(rows) == 1
        row = rows[0]
        assert (row["name"], row["size"], row["slots"]) == ("cam0", 6 << 20, 4)
        assert (row["sent"], row["in_use"]) == (4, 2)
        assert row["publisher"]["name"] == "camera"
        members = [(m["name"], m["start"], m["position"], m["lag"]) for m in row["subscribers"]]
        assert members == [("encoder", 1, 2, 2), ("viewer", 4, 4, 0)]

        text = ok(broker, "streams").splitlines()
        assert text[0].split() == list(STREAM_COLUMNS)
        assert text[1].split()[1:3] == ["cam0", f"camera/{row['publisher']['pid']}"]
        assert "at 2, lag 2" in text[2] and "encoder" in text[2]
        assert "at 4, lag 0" in text[3] and "viewer" in text[3]
        pub.close()
        assert json.loads(ok(broker, "streams", "--json")) == []
