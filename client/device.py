"""What the device is and has: the capabilities it reports, and training slots shared with other agents on
the same machine. Never imports torch."""

from __future__ import annotations

import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgeft.train.engines import available_engines, runtime_version
from edgeft.wire import Capabilities


def capabilities(cache_dir: Path, max_lora_rank: int | None = None) -> Capabilities:
    """This device's capabilities: OS, cores, memory, free disk under ``cache_dir``, ONNX Runtime and its
    execution providers, training engines, and the largest LoRA rank it trains (None: the job's)."""
    return Capabilities(os=f"{platform.system()} {platform.release()}", cores=os.cpu_count() or 1,
                        ram_bytes=_ram_bytes(), free_disk_bytes=shutil.disk_usage(cache_dir).free,
                        ort_version=runtime_version(), execution_providers=tuple(_providers()),
                        max_lora_rank=max_lora_rank or 0, engines=tuple(available_engines()))


@contextmanager
def training_slot(slots: tuple[Path, int] | None) -> Iterator[None]:
    """Hold one of ``slots[1]`` lock files in folder ``slots[0]`` (advisory file locks, released by the OS
    if the process dies) while the block runs; no-op for None."""
    if slots is None:
        yield
        return
    import fcntl

    folder, count = slots
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            fh = open(folder / f"slot-{index}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(0.2)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
