"""Latency, memory and throughput of the safety engine on this machine.

Measures, in one run:

1. the engine's compute for one ~30-token text (``engine.detect`` in process: p50, p99);
2. ``POST /v1/moderations`` end to end against ``safegate serve`` (p50, p99, sequential);
3. the forward pass of randomly initialised bert-base (Detoxify-original's architecture)
   and deberta-v3-base (LLM Guard's prompt-injection model's architecture) on the same
   token count, and the engine's speed-up over each;
4. resident memory of ``safegate serve`` with the engine loaded, and again after it has
   moderated ``--lines`` realistic texts (toxicchat-train's prompts, 16 per request);
5. throughput of ``safegate moderate`` over a ``--lines`` file of texts with
   toxicchat-train's length distribution (its own prompts, cycled), for the shipped
   engine and, in the same run, with ``--baseline-ref``, today's code serving the weights
   of that git ref, and with ``--baseline-code-ref``, the whole engine of that ref: its
   code and weights, run from a git worktree of it with this virtual environment.

Usage: .venv/bin/python bench/engine_latency.py [--requests 300] [--lines 10000]
       [--baseline-ref 71354db] [--baseline-code-ref 71354db] [--parts compute,serve,moderate]
(``--parts serve`` alone measures memory of ``safegate serve``; it needs no idle machine.)
Prints a JSON record; docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "Hey, can you help me write a short, friendly reminder email to my team about "
    "tomorrow's 10am planning meeting?"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def engine_compute(repeats: int) -> dict[str, float]:
    from gateway.config import Settings
    from gateway.engine_factory import build_engine

    home = Path(tempfile.mkdtemp())
    engine = build_engine(Settings(home=home), blocklists=None)
    tokens = len(engine.members[0].classifier.encoder.tokenizer(TEXT)["input_ids"])  # type: ignore[attr-defined]
    for _ in range(20):
        engine.detect([TEXT])
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.detect([TEXT])
        timings.append((time.perf_counter() - started) * 1000)
    per_member: dict[str, float] = {}
    reports = engine.detect([TEXT])[0]
    for report in reports:
        per_member[report.member] = round(report.latency_ms, 3)
    engine.close()
    return {
        "tokens": tokens,
        "p50_ms": round(percentile(timings, 0.5), 3),
        "p99_ms": round(percentile(timings, 0.99), 3),
        "members_ms_one_call": per_member,  # type: ignore[dict-item]
    }


def reference_forward(tokens: int, repeats: int) -> dict[str, float]:
    from transformers import BertConfig, BertModel, DebertaV2Config, DebertaV2Model

    models = {
        "bert-base (Detoxify original)": BertModel(BertConfig()),
        "deberta-v3-base (LLM Guard prompt injection)": DebertaV2Model(
            DebertaV2Config(
                vocab_size=128100,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=512,
                relative_attention=True,
                position_buckets=256,
                norm_rel_ebd="layer_norm",
                share_att_key=True,
                pos_att_type=["p2c", "c2p"],
                position_biased_input=False,
                type_vocab_size=0,
            )
        ),
    }
    out: dict[str, float] = {}
    ids = torch.randint(1000, 2000, (1, tokens))
    for name, model in models.items():
        model.eval()
        with torch.inference_mode():
            for _ in range(5):
                model(input_ids=ids)
            timings = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(input_ids=ids)
                timings.append((time.perf_counter() - started) * 1000)
        out[name] = round(percentile(timings, 0.5), 3)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_and_measure(requests: int, lines: int) -> dict[str, float]:
    port = free_port()
    home = Path(tempfile.mkdtemp())
    env = {**os.environ, "SAFEGATE_HOME": str(home)}
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [str(ROOT / ".venv/bin/safegate"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError("safegate serve did not become ready")
            # the developer key `safegate serve` makes on a first start
            key = (home / "local-developer.key").read_text(encoding="utf-8").strip()
            client.headers["Authorization"] = f"Bearer {key}"
            for _ in range(20):
                client.post("/v1/moderations", json={"input": TEXT})
            timings = []
            for _ in range(requests):
                started = time.perf_counter()
                response = client.post("/v1/moderations", json={"input": TEXT})
                timings.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            rss = psutil.Process(process.pid).memory_info().rss
            texts = sample_texts(lines)
            for start in range(0, len(texts), 16):
                batch = [text[:32_000] for text in texts[start : start + 16]]
                client.post("/v1/moderations", json={"input": batch}).raise_for_status()
            rss_after = psutil.Process(process.pid).memory_info().rss
        return {
            "p50_ms": round(percentile(timings, 0.5), 3),
            "p99_ms": round(percentile(timings, 0.99), 3),
            "requests": requests,
            "rss_mib": round(rss / 2**20, 1),
            f"rss_mib_after_{len(texts)}_texts": round(rss_after / 2**20, 1),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def moderate_throughput(
    lines: int, heads: Path | None = None, code: Path | None = None
) -> dict[str, float]:
    """``safegate moderate`` over ``lines`` texts; ``code``: a checkout whose ``gateway``
    package runs instead of this one's (the engine as it was at that checkout).

    A first run over one line fills the home's caches (the ONNX export and its int8
    quantisation, made once per installation), so the timed run loads the engine as every
    later run does."""
    texts = sample_texts(lines)
    folder = Path(tempfile.mkdtemp())
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text[:32_000]}) + "\n" for text in texts))
    warm = folder / "warm.jsonl"
    warm.write_text(json.dumps({"text": texts[0]}) + "\n")
    env = {**os.environ, "SAFEGATE_HOME": str(folder / "home")}
    if heads is not None:
        env["SAFEGATE_ENCODER__HEADS"] = str(heads)
    command = [str(ROOT / ".venv/bin/safegate")]
    if code is not None:
        env["PYTHONPATH"] = str(code)
        command = [sys.executable, "-c", "from gateway.cli import app; app()"]

    def moderate(path: Path) -> float:
        started = time.perf_counter()
        subprocess.run(  # noqa: S603 - our own CLI
            [*command, "moderate", "--input", str(path), "--output", str(folder / "out.jsonl")],
            env=env,
            cwd=code or ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - started

    moderate(warm)
    seconds = moderate(source)
    written = sum(1 for _ in (folder / "out.jsonl").open())
    return {
        "lines": written,
        "seconds_incl_load": round(seconds, 1),
        "texts_per_s": round(written / seconds, 1),
    }


def sample_texts(count: int) -> list[str]:
    shared = ROOT.parent / "shared/data/toxicchat-train/toxic_chat_train.json"
    if shared.exists():
        rows = json.loads(shared.read_text(encoding="utf-8"))["instances"]
        texts = [row["instance"] for row in rows]
    else:
        rows = (ROOT / "data/safety/own_examples.jsonl").read_text().splitlines()
        texts = [json.loads(row)["text"] for row in rows]
    return [texts[i % len(texts)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--baseline-ref", default=None, help="git ref of weights to compare")
    parser.add_argument(
        "--baseline-code-ref", default=None, help="git ref of a whole engine (code and weights)"
    )
    parser.add_argument(
        "--parts",
        default="compute,serve,moderate",
        help="comma-separated: compute (with the reference models), serve, moderate",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"compute", "serve", "moderate"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    record: dict[str, object] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        ),
    }
    if "compute" in parts:
        compute = engine_compute(args.requests)
        reference = reference_forward(int(compute["tokens"]), 30)
        record["engine_compute"] = compute
        record["reference_forward_p50_ms"] = reference
        record["speedup_vs"] = {
            name: round(ms / compute["p50_ms"], 1) for name, ms in reference.items()
        }
    if "serve" in parts:
        record["moderations_endpoint"] = serve_and_measure(args.requests, args.lines)
    if "moderate" in parts:
        record["moderate_cli"] = moderate_cli(args.lines, args.baseline_ref, args.baseline_code_ref)
    json.dump(record, sys.stdout, indent=2)
    sys.stdout.write("\n")


def moderate_cli(lines: int, baseline_ref: str | None, code_ref: str | None) -> dict[str, object]:
    throughput: dict[str, object] = {"shipped": moderate_throughput(lines)}
    if baseline_ref:
        from engine_compare import weights_at

        heads = weights_at(baseline_ref) / "heads.safetensors"
        throughput[f"weights of {baseline_ref}"] = moderate_throughput(lines, heads)
    if code_ref:
        worktree = Path(tempfile.mkdtemp()) / "engine"
        subprocess.run(  # noqa: S603 - git, our own repository
            ["git", "worktree", "add", "--detach", str(worktree), code_ref],  # noqa: S607
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            throughput[f"engine of {code_ref}"] = moderate_throughput(lines, code=worktree)
        finally:
            subprocess.run(  # noqa: S603
                ["git", "worktree", "remove", "--force", str(worktree)],  # noqa: S607
                cwd=ROOT,
                check=False,
                capture_output=True,
            )
    return throughput


if __name__ == "__main__":
    main()
