"""`sae` commands of the service: ``serve``, and the client ``submit``, ``jobs``, ``status``,
``wait``, ``cancel``, ``download`` that talk to a running server over HTTP."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.client import DEFAULT_URL, Client, ServiceError


class _Api:
    """:class:`service.client.Client` with its errors as CLI messages (``Error: 422: ...``)."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        self.client = Client(url, token, timeout)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except ServiceError as exc:
                raise click.ClickException(str(exc)) from None

        return call


def _api(ctx_url: str, token: str | None) -> _Api:
    return _Api(ctx_url, token)


url_option = click.option(
    "--url",
    envvar="SAE_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The service's address (env SAE_URL).",
)
token_option = click.option(
    "--token", envvar="SAE_TOKEN", default=None, help="Bearer token (env SAE_TOKEN)."
)


def _job_line(j: dict[str, Any]) -> str:
    cost = "-" if j.get("cost") is None else f"{j['cost']:.6g}"
    stage = f" {j['stage']}" if j.get("stage") else ""
    return (
        f"{j['id']}  {j['status']:<9}  {j['spec'].get('dataset', '')!s:<20}"
        f"  it {j['iteration']}/{j['max_iter']}{stage}  {100 * j['progress']:5.1f}%  cost {cost}"
    )


def _listen(host: str, port: int):
    """A socket bound to ``host:port``, or a ClickException saying why it cannot be."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(
            f"port: cannot listen on {host}:{port} ({exc.strerror or exc}); another program "
            "may be using it: choose another --port"
        ) from None
    return sock


def register(main: click.Group) -> None:
    """Add this module's commands to the `sae` group."""

    @main.command()
    @click.option("--data-root", type=click.Path(file_okay=False), help="Datasets folder.")
    @click.option("--state-dir", type=click.Path(file_okay=False), help="Job store folder.")
    @click.option("--host", help="Address to listen on [127.0.0.1].")
    @click.option("--port", type=int, help="Port [8000].")
    @click.option(
        "--allowed-host",
        "allowed_hosts",
        multiple=True,
        help="A host name clients reach the service by, besides localhost, 127.0.0.1, ::1 and "
        "--host (other Host headers are refused: DNS rebinding); repeatable; *.example.com "
        "for subdomains, * for any.",
    )
    @click.option("--token", help="Require this bearer token on the API.")
    @click.option("--scheduler", help="Dask scheduler tcp://HOST:PORT (default: embedded).")
    @click.option("--workers", type=int, help="Workers of the embedded LocalCluster [2].")
    @click.option("--threads-per-worker", type=int, help="Threads per embedded worker [1].")
    @click.option("--memory-limit", help="Memory limit per embedded worker [auto].")
    @click.option(
        "--dashboard-host",
        help="Interface of the embedded cluster's Dask dashboard [127.0.0.1: it has no "
        "authentication; 0.0.0.0 for every interface].",
    )
    @click.option(
        "--plan",
        type=click.Choice(["auto", "local", "distributed"]),
        help="Where the stages of jobs run [auto: a stage on small data as one task next to them].",
    )
    @click.option("--max-concurrent-jobs", type=int, help="Jobs running at once [1].")
    @click.option("--max-body-bytes", type=int, help="Largest JSON request body [1 MiB].")
    @click.option("--max-upload-bytes", type=int, help="Largest dataset upload [1 GiB].")
    @click.option("--log-level", default="info", show_default=True)
    def serve(log_level: str, **options: Any) -> None:
        """Run the training service (REST API, web page, job runner).

        Every option can also come from an environment variable SAE_<OPTION>, e.g.
        SAE_DATA_ROOT, SAE_STATE_DIR, SAE_TOKEN, SAE_SCHEDULER.
        """
        import logging

        import uvicorn
        from pydantic import ValidationError

        from service.app import create_app
        from service.errors import describe_errors
        from service.settings import Settings

        options["allowed_hosts"] = list(options["allowed_hosts"]) or None
        try:
            settings = Settings(**{k: v for k, v in options.items() if v is not None})
        except ValidationError as exc:
            raise click.ClickException(describe_errors(exc.errors(), dash=True)) from None
        # Bind before anything starts (the app's lifespan starts Dask): a busy port is one line.
        sock = _listen(settings.host, settings.port)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
        click.echo(
            f"sae serve: http://{settings.host}:{settings.port} data={settings.data_root} "
            f"state={settings.state_dir} scheduler={settings.scheduler or 'embedded'}",
            err=True,
        )
        if settings.host.strip("[]") in ("0.0.0.0", "::") and not settings.allowed_hosts:
            click.echo(
                f"sae serve: listening on every interface, but answering only to "
                f"{', '.join(settings.trusted_hosts)} in the Host header; add the names clients "
                "use with --allowed-host NAME (SAE_ALLOWED_HOSTS=a,b)",
                err=True,
            )
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=30,
        )
        uvicorn.Server(config).run(sockets=[sock])

    @main.command()
    @click.argument("spec_file", type=click.File("r"))
    @click.option("--idempotency-key", help="Retrying with the same key returns the same job.")
    @click.option("--wait", "wait_", is_flag=True, help="Wait for the job with a progress bar.")
    @url_option
    @token_option
    def submit(spec_file, idempotency_key, wait_, url, token) -> None:
        """Submit the training spec in SPEC_FILE (JSON, the fields of `sae train`); print the id."""
        try:
            spec = json.load(spec_file)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{spec_file.name}: not JSON ({exc})") from None
        api = _api(url, token)
        job = api.submit(spec, idempotency_key=idempotency_key)
        click.echo(job["id"])
        if wait_:
            sys.exit(_wait(api, job["id"], 1.0))

    @main.command()
    @click.option(
        "--status",
        "statuses",
        multiple=True,
        type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    )
    @click.option("--limit", type=int, default=50, show_default=True)
    @click.option("--offset", type=int, default=0)
    @click.option("--json", "as_json", is_flag=True, help="Print the JSON page.")
    @url_option
    @token_option
    def jobs(statuses, limit, offset, as_json, url, token) -> None:
        """List jobs, newest first."""
        page = _api(url, token).jobs(statuses, limit=limit, offset=offset)
        if as_json:
            click.echo(json.dumps(page, indent=2))
            return
        for j in page["items"]:
            click.echo(_job_line(j))
        click.echo(f"({len(page['items'])} of {page['total']})", err=True)

    @main.command()
    @click.argument("job_id")
    @click.option("--json", "as_json", is_flag=True, help="Print the whole JSON record.")
    @url_option
    @token_option
    def status(job_id, as_json, url, token) -> None:
        """Show a job's status and progress."""
        j = _api(url, token).job(job_id)
        if as_json:
            click.echo(json.dumps(j, indent=2))
            return
        click.echo(_job_line(j))
        if j.get("eta_seconds") is not None and j["status"] == "running":
            click.echo(f"eta {j['eta_seconds']:.0f} s")
        if j.get("error"):
            click.echo(f"error: {j['error']}")
        if j.get("dashboard_url"):
            click.echo(f"dashboard: {j['dashboard_url']}")

    @main.command()
    @click.argument("job_id")
    @click.option("--interval", type=float, default=1.0, show_default=True)
    @url_option
    @token_option
    def wait(job_id, interval, url, token) -> None:
        """Wait for a job with a progress bar; exit 0 if it succeeded, 1 otherwise."""
        sys.exit(_wait(_api(url, token), job_id, interval))

    @main.command()
    @click.argument("job_id")
    @url_option
    @token_option
    def cancel(job_id, url, token) -> None:
        """Cancel a queued or running job."""
        j = _api(url, token).cancel(job_id)
        click.echo(_job_line(j))

    @main.command()
    @click.argument("job_id")
    @click.option("--max-iter", type=click.IntRange(1), help="Extend a one-layer job to N.")
    @click.option("--wait", "wait_", is_flag=True, help="Wait for the job with a progress bar.")
    @url_option
    @token_option
    def resume(job_id, max_iter, wait_, url, token) -> None:
        """Continue a cancelled, failed or finished job from its last checkpoint."""
        api = _api(url, token)
        j = api.resume(job_id, max_iter)
        click.echo(_job_line(j))
        if wait_:
            sys.exit(_wait(api, job_id, 1.0))

    @main.command()
    @click.argument("job_id")
    @click.option("--wait", "wait_", is_flag=True, help="Wait for the job with a progress bar.")
    @url_option
    @token_option
    def retry(job_id, wait_, url, token) -> None:
        """Run a failed job again from its last checkpoint, with a fresh crash budget."""
        api = _api(url, token)
        j = api.retry(job_id)
        click.echo(_job_line(j))
        if wait_:
            sys.exit(_wait(api, job_id, 1.0))

    @main.command()
    @click.argument("job_id")
    @click.argument("directory", type=click.Path(file_okay=False))
    @url_option
    @token_option
    def download(job_id, directory, url, token) -> None:
        """Download a job's model.npz, history.json, filters.png and cost.png into DIRECTORY."""
        files = _api(url, token).download(job_id, directory)
        for f in files.values():
            note = " (partial: the last checkpoint; sae resume finishes it)" if f["partial"] else ""
            click.echo(f"{f['path']} ({f['bytes']} bytes){note}")


def _wait(api: _Api, job_id: str, interval: float) -> int:
    from tqdm import tqdm

    # Progress in percent of the job's iterations, with elapsed and remaining time (no rate:
    # "%/s" means nothing to a reader).
    bar = tqdm(
        total=100,
        desc=job_id,
        leave=True,
        file=sys.stderr,
        bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
    )

    def show(j: dict[str, Any]) -> None:
        bar.n = round(100 * j["progress"], 1)
        post = {"status": j["status"], "it": f"{j['iteration']}/{j['max_iter']}"}
        if j.get("stage"):
            post["stage"] = j["stage"]
        if j.get("cost") is not None:
            post["cost"] = f"{j['cost']:.5g}"
        bar.set_postfix(post, refresh=True)

    try:
        j = api.wait(job_id, interval=interval, on_update=show)
    finally:
        bar.close()
    click.echo(_job_line(j))
    if j.get("error"):
        click.echo(f"error: {j['error']}", err=True)
    return 0 if j["status"] == "succeeded" else 1
