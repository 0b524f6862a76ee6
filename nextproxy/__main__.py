"""``python -m nextproxy``: the same entry point as the ``nextproxy`` console script."""

from nextproxy.cli import main

raise SystemExit(main())
