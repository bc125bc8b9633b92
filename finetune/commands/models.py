"""``safegate models list|show|deploy|undeploy|delete`` and ``safegate finetune serve``.

The registry commands read and change ``finetune_models`` in the project's database;
``serve`` loads one base with every adapter deployed on it and answers OpenAI's chat API
(``finetune.serving``). A refused action (unknown model, delete while deployed, adapters
on several bases) prints why and exits 1; nothing prints a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from finetune.commands.apps import app, models
from finetune.db import Database
from finetune.errors import FinetuneError
from finetune.registry import ModelKind, ModelRegistry
from finetune.settings import get_settings
from safegate.offline import offline_defaults
from safegate.output import table_console

if TYPE_CHECKING:
    from finetune.serving.server import ServedModel

DEFAULT_SERVE_HOST = "127.0.0.1"

console = Console(stderr=True, soft_wrap=True)  # messages stay whole for copy and grep

NameArgument = Annotated[str, typer.Argument(help="The model's name ('safegate models list').")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(1)


@contextmanager
def _registry() -> Iterator[ModelRegistry]:
    """The registry on the configured database; a refused action exits 1 with its reason."""
    settings = get_settings()
    database = Database(settings.database, timeouts=settings.database_timeouts)
    try:
        database.migrate()
        yield ModelRegistry(database)
    except FinetuneError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or type(exc).__name__)
        _fail(f"cannot use the database ({type(exc).__name__}: {reason})")
    finally:
        database.dispose()


@models.command("list")
def list_models(as_json: JsonOption = False) -> None:
    """List base models and adapters, and which are deployed."""
    with _registry() as registry:
        found = registry.list()
    if as_json:
        typer.echo(json.dumps([model.summary() for model in found], indent=2))
        return
    if not found:
        console.print("no models yet; 'safegate finetune train' makes one")
        return
    table = Table("name", "kind", "base", "deployed", "created")
    for model in found:
        table.add_row(
            escape(model.name),
            model.kind.value,
            escape(model.base or "-"),
            "[green]yes[/]" if model.deployed else "no",
            model.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    table_console().print(table)


@models.command()
def show(name: NameArgument, as_json: JsonOption = False) -> None:
    """Show a model: base, hyperparameters, data sha256 and metrics."""
    with _registry() as registry:
        model = registry.get(name)
    details = model.details()
    if as_json:
        typer.echo(json.dumps(details, indent=2, sort_keys=True))
        return
    width = max(len(key) for key in details) + 2
    lines = [model.name] + [f"  {key:<{width}}{_cell(value)}" for key, value in details.items()]
    typer.echo("\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={json.dumps(v)}" for k, v in sorted(value.items())) or "-"
    return "-" if value is None else str(value)


@models.command()
def deploy(name: NameArgument) -> None:
    """Make an adapter servable under its name by 'safegate finetune serve'."""
    with _registry() as registry:
        model = registry.deploy(name)
    where = f" on base {model.base}" if model.base else ""
    console.print(
        f"deployed {escape(model.name)}{escape(where)}; a running 'safegate finetune serve' "
        "picks it up within seconds"
    )


@models.command()
def undeploy(name: NameArgument) -> None:
    """Stop serving a model (its files stay)."""
    with _registry() as registry:
        model = registry.undeploy(name)
    console.print(f"undeployed {escape(model.name)}")


@models.command()
def delete(
    name: NameArgument,
    keep_files: Annotated[
        bool, typer.Option("--keep-files", help="Leave the adapter's folder on disk.")
    ] = False,
) -> None:
    """Delete a model; refused while it is deployed, or for a base adapters still use."""
    models_dir = get_settings().models_dir.expanduser().resolve()
    with _registry() as registry:
        model = registry.get(name)
        # Only folders safegate made are removed; an adapter registered from elsewhere stays.
        owned = Path(model.path).expanduser().resolve().is_relative_to(models_dir)
        registry.delete(name, remove_files=owned and not keep_files)
    removed = model.kind is ModelKind.ADAPTER and owned and not keep_files
    suffix = f" and removed {model.path}" if removed else ""
    console.print(f"deleted {escape(model.name)}{escape(suffix)}")


@app.command()
def serve(
    base: Annotated[
        str | None,
        typer.Option(
            help="Base to serve: a registered base, a local folder or a hub id. "
            "Default: the base of the deployed adapters."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = DEFAULT_SERVE_HOST,
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on. Default: SAFEGATE_LOCAL_MODELS_PORT (8001)."),
    ] = None,
) -> None:
    """Serve a base and its deployed adapters with OpenAI's chat API (/v1)."""
    offline_defaults()
    from finetune.serving.app import create_app
    from finetune.serving.server import LocalModelServer, deployed_base

    with _registry() as registry:
        chosen = base or deployed_base(registry)
        with console.status(f"loading {escape(chosen)}"):
            server = LocalModelServer.open(chosen, registry=registry)
        _print_served(server.served(), failed=server.failed)
        port = port or get_settings().local_models_port
        console.print(f"listening on http://{host}:{port}/v1  (Ctrl-C stops)")
        import uvicorn

        uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)


def _print_served(served: list[ServedModel], *, failed: dict[str, str]) -> None:
    base, adapters = served[0], served[1:]
    names = ", ".join(escape(model.id) for model in adapters) or "none deployed"
    console.print(f"base {escape(base.id)}; adapters: {names}")
    for name, reason in sorted(failed.items()):
        console.print(f"[yellow]adapter {escape(name)} failed to load:[/] {escape(reason)}")
