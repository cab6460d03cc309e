"""Where a diverging run goes back to: the checkpoints written before its non-finite streak opened.

No checkpoint is written (and none rotated away) while a streak is open, so every checkpoint at or below the
iteration where the streak began holds weights from before it. A checkpoint a rewind already went back to,
and that diverged again, is not chosen twice: its weights are as bad as the ones they replaced, so the next
rewind goes one checkpoint further back.
"""

from __future__ import annotations

from moetrain.checkpoint import list_checkpoints


def rewind_target(save_dir: str | None, streak_start: int, rewound_to: frozenset[int] = frozenset()) -> int | None:
    """The newest checkpoint in `save_dir` from before the streak that began at iteration `streak_start`,
    leaving out those already rewound to (`rewound_to`); None when there is none."""
    before = [it for it in list_checkpoints(save_dir) if it <= streak_start and it not in rewound_to] \
        if save_dir else []
    return before[-1] if before else None

