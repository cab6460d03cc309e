"""pytest set-up: every test process (spawned ranks too, which import tests.helpers) runs one intra-op thread;
the shared helpers live in tests/helpers.py."""

import tests.helpers  # noqa: F401  (sets torch to one thread)
