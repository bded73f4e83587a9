"""The in-process limit's worker: it lives in an importable module so that spawned processes can run it."""

from __future__ import annotations

import time
from pathlib import Path

from service.model import OnnxModel
from service.preprocessing import decode, normalize


def in_process_worker(args) -> int:
    folder, payload, seconds, barrier_time = args
    model = OnnxModel(Path(folder), intra_op_threads=1)
    model.load()
    while time.time() < barrier_time:
        time.sleep(0.001)
    done, deadline = 0, time.time() + seconds
    while time.time() < deadline:
        model.predict(normalize(decode(payload, model.spec)[None], model.spec))
        done += 1
    return done
