"""The ``steward`` command: run the stack, migrate, bootstrap, check status."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import commands, gitops
from cli.client import CliError, describe_problem, load_key
from cli.output import errors
from cli.stack import SERVICES, Stack
from libs.common import apikeys

if TYPE_CHECKING:  # loaded by the commands that need them: `steward --help` starts without
    from pydantic import SecretStr

    from libs.common.settings import Settings

app = typer.Typer(
    help="Steward: the governance plane for generative AI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _settings() -> Settings:
    from libs.common.settings import Settings

    return Settings()


def _migrate(settings: Settings, services: tuple[str, ...]) -> None:
    # Imported here: alembic and SQLAlchemy are half the CLI's start-up, and only up/migrate
    # need them.
    from libs.common.migrate import upgrade

    for name in services:
        upgrade(name, settings)
        typer.echo(f"  migrated {name}")


def _show_key(title: str, key: str) -> None:
    line = "─" * 72
    typer.secho(f"\n{line}", fg="yellow")
    typer.secho(f"  {title} (shown once, store it now):", bold=True)
    typer.secho(f"\n    {key}\n", fg="green", bold=True)
    typer.echo(f"  export STEWARD_API_KEY={key}")
    typer.echo('  curl -H "Authorization: Bearer $STEWARD_API_KEY" http://127.0.0.1:8101/v1/whoami')
    typer.secho(line, fg="yellow")


def _bootstrap(settings: Settings) -> None:
    import asyncio

    from services.authz.app import bootstrap

    key = asyncio.run(bootstrap(settings))
    if key:
        _show_key("Bootstrap platform-admin API key", key)


def _with_service_keys(settings: Settings) -> Settings:
    """The gateway's and inference's own platform keys: configured, or (embedded mode) made once
    and kept under data_dir (0600). ``bootstrap`` installs them with their least scopes."""
    from pydantic import SecretStr

    keys: dict[str, SecretStr] = {}
    for service in ("gateway", "inference"):
        configured = getattr(settings, f"{service}_api_key")
        if configured is not None:
            continue
        path = settings.data_dir / f"{service}.key"
        if not path.exists():
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(apikeys.generate()[1])
        keys[f"{service}_api_key"] = SecretStr(path.read_text().strip())
    return settings.model_copy(update=keys)


def _secret(value: SecretStr | None) -> str:
    assert value is not None
    return value.get_secret_value()


@app.command()
def migrate(
    service: Annotated[str | None, typer.Argument(help="One service; all if omitted")] = None,
) -> None:
    """Apply database migrations."""
    if service is not None and service not in SERVICES:
        raise typer.BadParameter(f"unknown service; one of {', '.join(SERVICES)}")
    _migrate(_settings(), (service,) if service else SERVICES)


@app.command()
def keygen() -> None:
    """Print a fresh API key (stw_<8>_<32>) for STEWARD_*_API_KEY settings and Secrets."""
    typer.echo(apikeys.generate()[1])


@app.command()
def bootstrap() -> None:
    """Create the first platform-admin key (does nothing once an admin exists)."""
    _bootstrap(_settings())


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def up() -> None:
    """Start NATS and every service on the embedded default; Ctrl-C stops everything."""
    settings = _with_service_keys(_settings())
    stack = Stack(settings)
    signal.signal(signal.SIGTERM, _interrupt)
    typer.secho("Steward — starting on the embedded default", bold=True)
    try:
        typer.echo("  " + stack.start_nats())
        _migrate(settings, SERVICES)
        _bootstrap(settings)
        for name in SERVICES:
            env = {}
            if name == "inference":
                env["STEWARD_INFERENCE_API_KEY"] = _secret(settings.inference_api_key)
            url = stack.start_service(name, env)
            typer.echo(f"  {name:<10} {url}   (API docs: {url}/docs)")
        proxy, admin = stack.start_gateway(_secret(settings.gateway_api_key))
        typer.echo(f"  {'gateway':<10} {proxy}   (OpenAI base_url: {proxy}/v1, admin: {admin})")
        typer.secho(f"\nLogs in {stack.logs}. Press Ctrl-C to stop.", fg="cyan")
        died = stack.watch()
        typer.secho(f"{died} stopped unexpectedly; see {stack.logs}/{died}.log", fg="red")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass  # Ctrl-C (or SIGTERM) at any moment, starting included, is a normal stop
    except RuntimeError as exc:
        typer.secho(str(exc), fg="red")
        raise typer.Exit(1) from exc
    finally:
        typer.echo("stopping…")
        stack.stop()


@app.command()
def status(
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Readiness of every service and of the gateway."""
    import httpx

    settings = _settings()
    result: dict[str, object] = {}
    probes = {name: f"http://{settings.host}:{settings.port_for(name)}/readyz" for name in SERVICES}
    probes["gateway"] = f"http://{settings.host}:{settings.gateway_admin_port}/readyz"
    for name, url in probes.items():
        try:
            result[name] = httpx.get(url, timeout=2).json()
        except httpx.HTTPError as exc:
            result[name] = {"status": "down", "error": str(exc)}
    if output == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    for name, state in result.items():
        assert isinstance(state, dict)
        typer.echo(f"{name:<10} {state.get('status')}")


gateway_cli = typer.Typer(help="The gateway: its policy, for other gateways.", no_args_is_help=True)


@gateway_cli.command("export")
def gateway_export(
    format: Annotated[str, typer.Option("--format", help="kong: a Kong 3.x kong.yml")] = "kong",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write; stdout if omitted")
    ] = None,
) -> None:
    """Write the live gateway policy (routes, ACLs, quotas) as a Kong declarative config."""
    import httpx

    settings = _settings()
    admin = os.environ.get("STEWARD_GATEWAY_ADMIN_URL") or (
        f"http://{settings.host}:{settings.gateway_admin_port}"
    )
    try:
        key = load_key()
        response = httpx.get(
            f"{admin.rstrip('/')}/steward/export",
            params={"format": format},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    except CliError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        typer.secho(f"the gateway admin API is unreachable at {admin}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        typer.secho(describe_problem(response), fg="red", err=True)
        raise typer.Exit(1)
    if output is None:
        typer.echo(response.text, nl=False)
    else:
        output.write_text(response.text)
        typer.echo(f"wrote {output}")


admin_cli = typer.Typer(help="Break-glass, on the host that holds the database.")


@admin_cli.command("recover")
def admin_recover(
    owner: Annotated[str, typer.Option(help="the person the new key belongs to")] = "admin",
) -> None:
    """Mint a platform-admin key with every scope straight into authz's database (audited), for
    when every admin credential was lost. Needs the database, not the API."""
    import asyncio
    import getpass
    import socket

    from services.authz.app import recover

    actor = f"steward-admin-recover:{getpass.getuser()}@{socket.gethostname()}"
    _show_key(
        f"Recovered platform-admin API key for {owner!r}",
        asyncio.run(recover(_settings(), owner, actor)),
    )


app.add_typer(gateway_cli, name="gateway")
app.add_typer(admin_cli, name="admin")
app.command()(commands.login)
app.command()(commands.whoami)
app.command()(commands.approve)
app.command()(commands.reject)
app.add_typer(commands.projects, name="projects")
app.add_typer(commands.catalog, name="catalog")
app.add_typer(commands.requests, name="request")
app.add_typer(commands.keys, name="keys")
app.add_typer(commands.audit, name="audit")
app.add_typer(commands.report, name="report")
app.add_typer(commands.endpoints, name="endpoint")
app.command()(commands.usage)
app.command("apply")(gitops.apply)
app.command("diff")(gitops.diff)


def main() -> None:
    """Entry point: API errors end as one red line and exit code 2, never a traceback."""
    try:
        app()
    except CliError as exc:
        errors().print(f"[red]{exc}[/red]")
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
