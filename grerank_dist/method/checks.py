"""Value checks on tensors, read at once or deferred to the next point that reads the device anyway.

A check such as "no valid score is NaN" must read a tensor's values; on a GPU that read waits for
every kernel queued so far (a host synchronisation), which stalls the training loop once per
check. Called on their own, the library's functions check at once and name the offending rows.
The trainer runs its steps inside :func:`deferred_checks`: a failed check is then kept as a flag
on the device, OR-ed with the same check's earlier flags, and all flags are read in one transfer
when the trainer reads its logged losses (:meth:`DeferredChecks.raise_failed`), raising the same
message for the range of steps since the previous read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["DeferredChecks", "deferred_checks", "require"]


class DeferredChecks:
    """The failed-check flags of a stretch of steps, one device flag per distinct message."""

    def __init__(self) -> None:
        self._flags: dict[str, torch.Tensor] = {}

    def record(self, failed: torch.Tensor, message: str) -> None:
        flag = failed.detach().reshape(())
        previous = self._flags.get(message)
        self._flags[message] = flag if previous is None else previous | flag

    def raise_failed(self, where: str) -> None:
        """Read every flag (one transfer) and raise ``ValueError`` naming ``where`` if any is set."""
        if not self._flags:
            return
        messages = list(self._flags)
        failed = torch.stack([self._flags[m] for m in messages]).tolist()
        self._flags.clear()
        broken = [m for m, bad in zip(messages, failed) if bad]
        if broken:
            raise ValueError(f"{where}: " + "; ".join(broken))


# Per thread (and task): a DataLoader thread or an evaluation beside the trainer checks at once.
_active: ContextVar[DeferredChecks | None] = ContextVar("grerank_deferred_checks", default=None)


@contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Within this block (in this thread) :func:`require` records its flags instead of reading them."""
    checks = DeferredChecks()
    token = _active.set(checks)
    try:
        yield checks
    finally:
        _active.reset(token)


def require(failed: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message)`` when the bool tensor ``failed`` holds True, with ``detail()``
    (e.g. the offending rows, which costs another read) appended when checked at once; inside
    :func:`deferred_checks` the flag is kept for the next read instead."""
    active = _active.get()
    if active is not None:
        active.record(failed, message)
        return
    if bool(failed):
        raise ValueError(message + (f" {detail()}" if detail is not None else ""))
