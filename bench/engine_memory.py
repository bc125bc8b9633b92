"""Resident memory of the safety engine in process: loaded, then after ``--texts``
toxicchat-train prompts (16 per check, as ``/v1/moderations`` batches them), with ONNX
Runtime's CPU memory arena on (the default) or off (``--no-arena``), and glibc's mmap
threshold fixed as the engine sets it (the default) or left to glibc's own adjustment
(``--glibc-default``, the behaviour before ``gateway/safety/allocator.py``).

Time budgets are lifted (``engine_compare.engine_for``) so a loaded machine does not turn
long texts into failures.
Usage: .venv/bin/python bench/engine_memory.py [--texts 600] [--no-arena] [--glibc-default]
Prints one JSON line; docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import onnxruntime  # noqa: E402
import psutil  # noqa: E402
from engine_compare import engine_for  # noqa: E402 - bench/, beside this script

from gateway import engine_factory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOXICCHAT = ROOT.parent / "shared/data/toxicchat-train/toxic_chat_train.json"
SHIPPED_WEIGHTS = ROOT / "gateway/safety/weights"


def without_arena() -> None:
    """Every ONNX Runtime session made from now on allocates without the CPU arena."""
    original = onnxruntime.SessionOptions

    class Options(original):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.enable_cpu_mem_arena = False

    onnxruntime.SessionOptions = Options  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--no-arena", action="store_true")
    parser.add_argument("--glibc-default", action="store_true")
    args = parser.parse_args()
    if args.no_arena:
        without_arena()
    if args.glibc_default:
        engine_factory.fix_mmap_threshold = lambda: False  # type: ignore[assignment]
    rows = json.loads(TOXICCHAT.read_text(encoding="utf-8"))["instances"]
    texts = [row["instance"][:32_000] for row in rows][: args.texts]
    engine = engine_for(SHIPPED_WEIGHTS)  # every member's time budget lifted
    engine.check(["hello"])
    process = psutil.Process()
    loaded = process.memory_info().rss
    started = time.perf_counter()
    errors = 0
    for start in range(0, len(texts), 16):
        verdicts = engine.check(texts[start : start + 16])
        errors += sum(any(r.error is not None for r in v.members) for v in verdicts)
    print(  # noqa: T201
        json.dumps(
            {
                "arena": not args.no_arena,
                "mmap_threshold": "glibc's own" if args.glibc_default else "fixed",
                "texts": len(texts),
                "rss_loaded_mib": round(loaded / 2**20),
                "rss_after_mib": round(process.memory_info().rss / 2**20),
                "seconds": round(time.perf_counter() - started, 1),
                "texts_with_member_errors": errors,
            }
        )
    )


if __name__ == "__main__":
    main()
