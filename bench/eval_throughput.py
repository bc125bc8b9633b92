"""Eval throughput: examples per second of ``safegate eval run``, first run versus an
unchanged rerun (every call from the cache, every metric's scores reused).

Two upstreams:

(a) a stub OpenAI server in this process that answers each call after a fixed
    ``--latency-ms`` (``Answer: <question>``), reached through litellm;
(b) the offline demo model through the gateway: ``safegate finetune demo`` in a temporary
    SAFEGATE_HOME, then ``safegate serve`` as a subprocess, with the developer key it writes.
    Skipped, saying why, with ``--no-demo`` or when it cannot start in ``--demo-timeout-s``.

Each upstream is measured two ways, each in its own fresh database: in process, through
the runner API (``Runner.run``), and through the CLI (``safegate eval run`` as a
subprocess, whose import time is part of what a user waits for). The in-process rerun is
also timed with score reuse switched off, which is what a rerun cost before it.
The suite scores quality (exact_match, rougeL, bleu) and safety (harm_rate, refusal_rate,
filter_rate) metrics, so a first run loads evaluate modules and the safety engine.

Usage: .venv/bin/python bench/eval_throughput.py [--examples 200] [--latency-ms 50]
       [--concurrency 8] [--no-stub] [--no-demo] [--demo-home DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parent.parent
SAFEGATE = ROOT / ".venv" / "bin" / "safegate"
DATA = ROOT / "data" / "evals"
METRICS = ["exact_match", "rougeL", "bleu", "harm_rate", "refusal_rate", "filter_rate"]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TOKENIZERS_PARALLELISM": "false",
}
TOPICS = ["reset", "pair a controller", "update", "clean the fan", "format storage", "eject"]


RESCORING = """
import sys
from evals.runs import RunStore
RunStore.scored_metric = lambda *args, **kwargs: None
from safegate.cli import main
sys.argv = ["safegate", "eval", "run", sys.argv[1], "--no-progress"]
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- (a) the stub upstream -----------------------------------------------------------------


def stub_app(latency_s: float) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict[str, Any]:
        body = await request.json()
        await asyncio.sleep(latency_s)
        question = body["messages"][-1]["content"]
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Answer: {question}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
        }

    return app


def start_stub(latency_s: float) -> int:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(latency_s), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 15
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return port


def stub_suite(folder: Path, *, port: int, examples: int, concurrency: int) -> Path:
    """A prompt suite of ``examples`` distinct questions, a third of them labelled harmful
    (the stub answers them all: refusal_rate has something to count)."""
    rows = []
    for n in range(examples):
        question = f"Question {n}: how do I {TOPICS[n % len(TOPICS)]} on console model {n}?"
        rows.append(
            {
                "id": f"q{n}",
                "prompt": question,
                "reference": f"Answer: {question}" if n % 4 else "Hold the power button.",
                "labels": {"harmful": n % 3 == 0},
            }
        )
    (folder / "questions.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    suite = {
        "name": "throughput",
        "datasets": [{"name": "questions", "path": "questions.jsonl", "format": "prompt"}],
        "models": [
            {
                "name": "stub",
                "via": "litellm",
                "model": "openai/stub",
                "params": {"api_base": f"http://127.0.0.1:{port}/v1", "api_key": "stub"},
                "max_retries": 0,
            }
        ],
        "generation": {"temperature": 0, "max_tokens": 64},
        "metrics": METRICS,
        "concurrency": concurrency,
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


# -- (b) the demo model through the gateway --------------------------------------------------


def demo_suite(folder: Path, *, base_url: str, concurrency: int) -> Path:
    """The shipped smoke and safety data (12 support questions, 95 labelled prompts)."""
    datasets: list[dict[str, str]] = [
        {
            "name": "console_support_qa",
            "path": str(DATA / "console_support_qa.jsonl"),
            "format": "chat",
        }
    ]
    for name in ("harmful", "benign_risky", "jailbreak"):
        path = DATA / f"{name}_prompts.jsonl"
        datasets.append({"name": name, "path": str(path), "format": "prompt"})
    suite = {
        "name": "throughput-demo",
        "datasets": datasets,
        "models": [
            {"name": "demo", "via": "gateway", "base_url": base_url, "api_key_env": "SAFEGATE_KEY"}
        ],
        "generation": {"temperature": 0, "max_tokens": 120, "seed": 0},
        "metrics": METRICS,
        "concurrency": concurrency,
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


@contextmanager
def demo_gateway(home: Path, timeout_s: float) -> Iterator[tuple[str, str] | str]:
    """Yields (base_url, key), or the reason the demo could not start."""
    env = {**os.environ, "SAFEGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    trained = subprocess.run(  # noqa: S603 - our own CLI
        [str(SAFEGATE), "finetune", "demo", "--if-missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if trained.returncode != 0:
        yield f"safegate finetune demo failed: {trained.stderr.strip()[-300:]}"
        return
    port = free_port()
    env["SAFEGATE_RATE_LIMIT__REQUESTS_PER_MINUTE"] = "1000000"
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [str(SAFEGATE), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group: the local model server it starts goes too
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while time.monotonic() - started < timeout_s:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            yield f"safegate serve was not ready within {timeout_s:.0f} s"
            return
        key = (home / "local-developer.key").read_text(encoding="utf-8").strip()
        yield f"{base}/v1", key
    finally:
        # SIGTERM to serve alone leaves its local model server running: end the group
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


# -- measuring -------------------------------------------------------------------------------


def in_process(suite: Path, home: Path, *, reuse_off_rerun: bool) -> dict[str, Any]:
    """First run, unchanged rerun (and optionally a rerun without score reuse), timed
    around ``Runner.run`` in this process against a fresh database under ``home``."""
    from evals.cache import CallCache
    from evals.db import Database
    from evals.runner import Runner
    from evals.runs import RunStatus, RunStore
    from evals.settings import get_settings

    os.environ["SAFEGATE_HOME"] = str(home)
    get_settings.cache_clear()
    database = Database(get_settings().database, timeouts=get_settings().database_timeouts)
    database.migrate()
    store = RunStore(database, runs_dir=get_settings().runs_dir)
    runner = Runner(store, CallCache(database), progress=False)
    result: dict[str, Any] = {}

    def timed(label: str, action: Callable[[], Any]) -> None:
        started = time.perf_counter()
        (run,) = action()
        seconds = time.perf_counter() - started
        if run.status is not RunStatus.SUCCEEDED:
            raise RuntimeError(f"{label}: run {run.id} {run.status}: {run.error}")
        result[label] = {
            "seconds": round(seconds, 3),
            "examples_per_s": round(run.counts["samples"] / seconds, 1),
            "called": run.counts["called"],
            "cached": run.counts["cached"],
            "reused_metrics": sum("reused_from" in m for m in run.metrics.values()),
            "filtered": run.counts["filtered_prompt"] + run.counts["filtered_completion"],
            "metrics": {name: m["value"] for name, m in sorted(run.metrics.items())},
        }

    try:
        timed("first", lambda: runner.run(suite))
        timed("rerun", lambda: runner.run(suite))
        if reuse_off_rerun:  # what a rerun cost before scores were reused
            original = RunStore.scored_metric
            RunStore.scored_metric = lambda *args, **kwargs: None  # type: ignore[method-assign]
            try:
                timed("rerun_rescoring", lambda: runner.run(suite))
            finally:
                RunStore.scored_metric = original  # type: ignore[method-assign]
    finally:
        database.dispose()
        get_settings.cache_clear()
    result["rerun_share"] = round(result["rerun"]["seconds"] / result["first"]["seconds"], 4)
    return result


def via_cli(suite: Path, home: Path, env: dict[str, str]) -> dict[str, Any]:
    """``safegate eval run`` as a subprocess: first run and unchanged rerun, wall clock,
    a rerun with score reuse switched off (what a rerun cost before), and the CLI's fixed
    cost (``safegate eval list`` on the same database)."""
    env = {**env, "SAFEGATE_HOME": str(home)}
    result: dict[str, Any] = {}
    for label in ("first", "rerun"):
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603 - our own CLI
            [str(SAFEGATE), "eval", "run", str(suite), "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"cli {label}: exit {done.returncode}: {done.stderr[-500:]}")
        run_id = done.stdout.split()[-1]
        shown = subprocess.run(  # noqa: S603 - our own CLI
            [str(SAFEGATE), "eval", "show", run_id, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(shown.stdout)
        result[label] = {
            "seconds": round(seconds, 3),
            "examples_per_s": round(record["counts"]["samples"] / seconds, 1),
            "called": record["counts"]["called"],
            "cached": record["counts"]["cached"],
            "reused_metrics": sum("reused_from" in m for m in record["metrics"].values()),
        }
    # what a CLI rerun cost before scores were reused: the same command, reuse switched off
    started = time.perf_counter()
    subprocess.run(  # noqa: S603 - our own CLI, with one method replaced
        [str(ROOT / ".venv" / "bin" / "python"), "-c", RESCORING, str(suite)],
        env=env,
        capture_output=True,
        check=True,
    )
    result["rerun_rescoring_seconds"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    subprocess.run(  # noqa: S603 - our own CLI
        [str(SAFEGATE), "eval", "list", "--json"], env=env, capture_output=True, check=True
    )
    result["cli_fixed_seconds"] = round(time.perf_counter() - started, 3)
    result["rerun_share"] = round(result["rerun"]["seconds"] / result["first"]["seconds"], 4)
    return result


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-stub", action="store_true", help="Skip (a), the stub upstream.")
    parser.add_argument("--no-demo", action="store_true", help="Skip (b), the demo model.")
    parser.add_argument("--demo-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--demo-home",
        type=Path,
        default=None,
        help="A SAFEGATE_HOME to train the demo in (kept; reused when trained already).",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    for name, value in OFFLINE.items():  # as ``safegate eval run`` sets them
        os.environ.setdefault(name, value)
    env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="eval-throughput-"))
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_before": load_average(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    try:
        if args.no_stub:
            report["stub"] = {"skipped": "--no-stub"}
        else:
            port = start_stub(args.latency_ms / 1000)
            folder = work / "stub"
            folder.mkdir()
            suite = stub_suite(
                folder, port=port, examples=args.examples, concurrency=args.concurrency
            )
            report["stub"] = {
                "in_process": in_process(suite, work / "stub-home-api", reuse_off_rerun=True),
                "cli": via_cli(suite, work / "stub-home-cli", env),
            }
            print(json.dumps({"stub": report["stub"]}, indent=2), flush=True)  # noqa: T201
        if args.no_demo:
            report["demo"] = {"skipped": "--no-demo"}
        else:
            demo_home = args.demo_home or work / "demo-home"
            with demo_gateway(demo_home, args.demo_timeout_s) as started:
                if isinstance(started, str):
                    report["demo"] = {"skipped": started}
                else:
                    base_url, key = started
                    folder = work / "demo"
                    folder.mkdir()
                    suite = demo_suite(folder, base_url=base_url, concurrency=args.concurrency)
                    os.environ["SAFEGATE_KEY"] = key
                    report["demo"] = {
                        "in_process": in_process(
                            suite, work / "demo-home-api", reuse_off_rerun=False
                        ),
                        "cli": via_cli(suite, work / "demo-home-cli", {**env, "SAFEGATE_KEY": key}),
                    }
        report["load_average_after"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
