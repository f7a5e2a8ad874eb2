"""``python -m bufbroker.flight``: the same as ``bufbroker-flight``."""

from ._main import main

raise SystemExit(main())
