"""Child process of the fault-injection tests: one extraction, killed at a chosen store write.

Usage: ``python -m tests.pipeline.kill_child CONFIG_JSON``; environment:

- ``KVKD_KILL_AT=K``: at the K-th write to the local store (1-based; every object zarr writes:
  group/array ``zarr.json``, shard objects, checksums, flags, attributes) write half of the
  object to zarr's temporary ``*.partial`` file, then SIGKILL this process (a torn write). On an
  fsspec store (``s3://``: a PUT is atomic, nothing is torn) it is SIGKILLed before the K-th write.
- ``KVKD_SIGNAL_AT=SIG:K``: send SIG (INT or TERM) to this process just before the K-th write,
  and continue (the CLI's handling is what is tested, so it runs through ``kvkd.cli``).
- ``KVKD_COUNT_FILE``: write the number of store writes there at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import uuid
from pathlib import Path


def main() -> None:
    from zarr.storage import LocalStore

    kill_at = int(os.environ.get("KVKD_KILL_AT", "0"))
    sig, _, sig_at = os.environ.get("KVKD_SIGNAL_AT", ":0").partition(":")
    sig_at = int(sig_at or 0)
    count = {"n": 0}
    real_set = LocalStore.set

    async def set(self, key, value):
        count["n"] += 1
        if count["n"] == kill_at:
            path = Path(self.root) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            data = value.to_bytes()
            path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        if count["n"] == sig_at:
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
        return await real_set(self, key, value)

    LocalStore.set = set
    from zarr.storage import FsspecStore

    real_remote_set = FsspecStore.set

    async def remote_set(self, key, value, byte_range=None):
        count["n"] += 1
        if count["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return await real_remote_set(self, key, value, byte_range) if byte_range is not None else await real_remote_set(self, key, value)

    FsspecStore.set = remote_set
    if os.environ.get("KVKD_COUNT_FILE"):
        atexit.register(lambda: Path(os.environ["KVKD_COUNT_FILE"]).write_text(str(count["n"])))
    import torch

    torch.set_num_threads(1)
    from kvkd.cli import app

    args = ["extract"]
    for k, v in json.loads(sys.argv[1]).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    app(args, standalone_mode=True)


if __name__ == "__main__":
    main()
