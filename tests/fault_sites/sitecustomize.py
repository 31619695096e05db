"""Run by every Python process started with this folder on PYTHONPATH: the Ray workers of the fault tests
(tests/toy/test_toy_workers.py). With MINIBT_FAULT_KILL_SHARDS="KIND:SHARD[,KIND:SHARD...]", a Ray worker
running such a shard's first attempt SIGKILLs itself after its first progress update, so a worker dies
mid-shard at a known place. minibt itself knows nothing of it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys

SHARDS = [s for s in os.environ.get("MINIBT_FAULT_KILL_SHARDS", "").split(",") if s]


class _KillInWorkers(importlib.abc.MetaPathFinder):
    """Patches minibt.ray_pool's worker-side progress (`_Bar.update`) as the module is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "minibt.ray_pool":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def load_and_patch(module):
            load(module)
            update = module._Bar.update

            def update_then_die(bar, n):
                update(bar, n)
                if bar.task.attempt == 0 and f"{bar.task.work.kind}:{bar.task.shard}" in SHARDS:
                    os.kill(os.getpid(), signal.SIGKILL)

            module._Bar.update = update_then_die

        spec.loader.exec_module = load_and_patch
        return spec


if SHARDS:
    sys.meta_path.insert(0, _KillInWorkers())
