"""The ``qwen-image-server`` command: ``serve``, ``plan`` and ``tiny-model``."""

from __future__ import annotations

import inspect
import logging
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from typer.models import OptionInfo

from .cli_run import checked_specs, run_server, start_paths
from .cli_settings import RENAMED as _RENAMED
from .cli_settings import env_names as _env_names
from .cli_settings import settings_from_options, settings_problem
from .config import Settings
from .config_scoped import SCOPED_NUMBERS
from .logs import API_FORMAT, LOG_LEVELS
from .models.tiny import demo_model_entries, ensure_tiny_model

__all__ = [
    "app",
    "demo_model_entries",
    "ensure_tiny_model",
    "main",
    "settings_from_options",
    "settings_problem",
]  # for bench/, tests

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="OpenAI-compatible image server for Qwen-Image."
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"qwen-image-server {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """OpenAI-compatible image server for Qwen-Image."""


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    kind: Annotated[str, typer.Option(help="text-to-image, edit or edit-plus")] = "text-to-image",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.", min=0, max=2**63 - 1)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that holds files already.")] = False,
) -> None:
    """Write a tiny random-weight Qwen-Image pipeline (offline) for tests and demos."""
    from .models import tiny

    if kind not in tiny.TINY_KINDS:
        raise typer.BadParameter(f"choose one of {', '.join(tiny.TINY_KINDS)}", param_hint="--kind")
    if directory.exists() and not directory.is_dir():
        typer.echo(f"error: {directory} is a file, not a folder", err=True)
        raise typer.Exit(2)
    try:
        held = sorted(entry.name for entry in directory.iterdir())[:3] if directory.is_dir() and not force else []
    except OSError as exc:  # a folder that cannot be listed
        typer.echo(f"error: cannot write a model to {directory}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    if held:
        typer.echo(
            f"error: {directory} is not empty ({', '.join(held)}): pass --force to write a tiny model there, replacing "
            "the files it writes",
            err=True,
        )
        raise typer.Exit(2)
    try:
        tiny.build_tiny_model(directory, kind, seed=seed)  # type: ignore[arg-type]
    except OSError as exc:  # a folder that cannot be made or written (/proc/x, no permission, disk full)
        typer.echo(f"error: cannot write a model to {directory}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote a tiny {kind} model to {directory}")


#: The boolean profile flags, which take ``on|off@MODEL`` for one model as every other profile setting takes
#: ``VALUE@MODEL``: click's on/off flags take no value, so every form of one (``--compile``, ``--no-compile``,
#: ``--compile on@m``, ``--compile=off``) is read as the hidden list option beside the flag (``--compile-for on``,
#: ``--compile-for off``, ``--compile-for on@m``...), in the order given: the last value wins, as for every flag.
SCOPED_BOOLEAN_FLAGS = {"--compile": "--compile-for", "--deterministic": "--deterministic-for"}


def scoped_boolean_args(args: list[str]) -> list[str]:
    """``args`` with each boolean profile flag spelled as its list option (``--compile-for VALUE``): a bare flag is
    ``on``, its ``--no-`` form ``off``, one given a value (``--compile on@m``, ``--compile=off@m``) that value;
    everything else as it was. ``serve`` and ``plan`` take no positional argument, so a word after the flag that is
    no option can only be its value (a wrong one is then refused as the profile's value, naming the model)."""
    negated = {"--no-" + flag[2:]: option for flag, option in SCOPED_BOOLEAN_FLAGS.items()}
    out: list[str] = []
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if args[i] == "--":
            out += args[i:]
            break
        if flag in SCOPED_BOOLEAN_FLAGS and eq:
            out += [SCOPED_BOOLEAN_FLAGS[flag], value]
        elif args[i] in SCOPED_BOOLEAN_FLAGS and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out += [SCOPED_BOOLEAN_FLAGS[args[i]], args[i + 1]]
            i += 1
        elif args[i] in SCOPED_BOOLEAN_FLAGS:
            out += [SCOPED_BOOLEAN_FLAGS[args[i]], "on"]
        elif args[i] in negated:
            out += [negated[args[i]], "off"]
        else:
            out.append(args[i])
        i += 1
    return out


class _ServeCommand(typer.core.TyperCommand):
    """``serve`` and ``plan``: their arguments read with ``scoped_boolean_args`` first."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, scoped_boolean_args(args))


@app.command(cls=_ServeCommand)
def serve(
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", metavar="[ID=]SOURCE", help="[ID=]PATH_OR_HUB_ID; repeat for several.")
    ] = None,
    demo: Annotated[
        bool | None,
        typer.Option("--demo/--no-demo", help="Also serve the tiny offline models (built once into the cache), listed first."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [PORT].")] = None,
    max_connections: Annotated[int | None, typer.Option(help="Connections served at once [QIS_MAX_CONNECTIONS].")] = None,
    header_timeout: Annotated[float | None, typer.Option(help="Seconds to send a request head [QIS_HEADER_TIMEOUT].")] = None,
    shutdown_grace_seconds: Annotated[
        float | None,
        typer.Option("--shutdown-grace", help="Seconds running requests get on SIGTERM [QIS_SHUTDOWN_GRACE_SECONDS]."),
    ] = None,
    workers: Annotated[
        list[str] | None,
        typer.Option(
            metavar="N or N@MODEL", help="Worker processes (GPUs) per model [NUM_GPUS_TO_USE]; N@MODEL for one model; repeat."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:0,cuda:1,...")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, float32 on CPU), bfloat16, float16, float32")] = None,
    memory_check: Annotated[
        str | None, typer.Option(help="on (refuse a plan that does not fit), warn or off [QIS_MEMORY_CHECK].")
    ] = None,
    queue_size: Annotated[
        list[str] | None,
        typer.Option(metavar="N or N@MODEL", help="Waiting requests per model [TASK_QUEUE_SIZE]; N@MODEL for one model."),
    ] = None,
    task_timeout: Annotated[
        list[str] | None,
        typer.Option(metavar="S or S@MODEL", help="Seconds from acceptance [TASK_TIMEOUT]; S@MODEL for one model."),
    ] = None,
    stuck_task_seconds: Annotated[
        list[str] | None,
        typer.Option(
            metavar="S or S@MODEL",
            help="Seconds a task told to stop may keep its worker before the worker is killed [QIS_STUCK_TASK_SECONDS]; "
            "S@MODEL for one model.",
        ),
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Images of one request per pipeline call (1-10).")] = None,
    share_components: Annotated[
        bool | None,
        typer.Option(
            "--share-components/--no-share-components",
            help="One worker process per slot serves every model; identical text encoders and VAEs load once "
            "[QIS_SHARE_COMPONENTS].",
        ),
    ] = None,
    cpu_threads: Annotated[int | None, typer.Option(help="Torch threads per CPU worker [QIS_CPU_THREADS].")] = None,
    image_output_dir: Annotated[str | None, typer.Option(help="Where url images are stored [IMAGE_OUTPUT_DIR].")] = None,
    image_url_prefix: Annotated[str | None, typer.Option(help="URL prefix of stored images [IMAGE_DOWNLOAD_URL_PREFIX].")] = None,
    engine: Annotated[str | None, typer.Option(help="local (worker processes here) or ray (Ray Serve)")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (ray://host:10001 or auto); none: start one")
    ] = None,
    ray_gpus_per_replica: Annotated[
        list[str] | None,
        typer.Option(
            metavar="S or S@MODEL",
            help="--engine ray: GPUs per model replica, 1 or a share of one (0: the CPU) [QIS_RAY_GPUS_PER_REPLICA]; "
            "S@MODEL for one model.",
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile", help="Regional torch.compile, warmed at start-up; --compile on|off@MODEL: one model."
        ),
    ] = None,
    compile_for: Annotated[list[str] | None, typer.Option("--compile-for", hidden=True)] = None,
    compile_sizes: Annotated[
        list[str] | None, typer.Option(metavar="WxH,...[@MODEL]", help="WIDTHxHEIGHT,...[@MODEL] warmed when compiling.")
    ] = None,
    cache: Annotated[
        list[str] | None,
        typer.Option(metavar="POLICY[@MODEL]", help="Step cache POLICY[:KEY=VALUE,...][@MODEL]: fbcache, taylorseer or none."),
    ] = None,
    quantize: Annotated[
        list[str] | None,
        typer.Option(
            metavar="none|fp8|int4[@MODEL]", help="none, fp8 or int4[@MODEL]: FP8 or 4-bit linear layers in the transformer."
        ),
    ] = None,
    cfg_batch: Annotated[
        list[str] | None,
        typer.Option(metavar="auto|on|off[@MODEL]", help="auto, on or off[@MODEL]: true CFG as one batch of two."),
    ] = None,
    attention_backend: Annotated[
        list[str] | None, typer.Option(metavar="BACKEND[@MODEL]", help="diffusers attention backend[@MODEL].")
    ] = None,
    weights_dtype: Annotated[
        list[str] | None, typer.Option(metavar="auto|fp8[@MODEL]", help="auto or fp8[@MODEL]: FP8 weight storage.")
    ] = None,
    offload: Annotated[
        list[str] | None, typer.Option(metavar="MODE[@MODEL]", help="none, text-encoder, group, model, sequential[@MODEL].")
    ] = None,
    vae_tiling: Annotated[
        list[str] | None,
        typer.Option(metavar="off|on[@MODEL]", help="off or on[@MODEL]: the VAE decodes and encodes in tiles (less memory)."),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic CUDA kernels (slower); --deterministic on|off@MODEL: one model [QIS_DETERMINISTIC].",
        ),
    ] = None,
    deterministic_for: Annotated[list[str] | None, typer.Option("--deterministic-for", hidden=True)] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            metavar="NAME=PATH[@MODEL]",
            help="NAME=PATH[:fuse=true,scale=S,preset=lightning,steps=N,...][@MODEL]; PATH a file or "
            "hf:ORG/NAME/FILE.safetensors (revision=REV); repeat.",
        ),
    ] = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option(
            "--model-alias",
            metavar="ALIAS=NAME",
            help="ALIAS=NAME: another name of a model or LoRA id (e.g. dall-e-3=qwen-image); repeat.",
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", metavar="KEY", help="A key clients must send (Bearer); repeat.")
    ] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="A file of API keys, one per line.")] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option("--cors-origin", metavar="ORIGIN", help="A web origin allowed to call the API; repeat.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error", callback=lambda v: _log_level(v))] = "info",
) -> None:
    """Serve the OpenAI-compatible Images API."""
    options = dict(locals())
    from .api.security import install_request_id_logging

    install_request_id_logging()
    logging.basicConfig(level=log_level.upper(), format=API_FORMAT)
    try:
        with start_paths():
            settings = settings_from_options(options)
        run_server(settings, log_level)
    except ValueError as exc:  # pydantic's ValidationError and ModelConfigError are ValueErrors
        typer.echo(f"error: {exc}", err=True)
        from .models.plan_result import PlanError  # no torch: the API process has it loaded by now anyway

        if isinstance(exc, PlanError) and exc.about_memory:
            typer.echo("If the estimate is wrong for this machine, --memory-check warn serves anyway.", err=True)
        raise typer.Exit(2) from None


def _log_level(value: str) -> str:
    """``--log-level``, checked where click reports a bad option (exit 2) rather than in ``logging`` (a traceback)."""
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.lower()


#: What ``plan --engine ray`` says once the start checks pass: serve makes no plan under Ray either.
RAY_PLAN = (
    "{models}: the start checks pass. Under --engine ray no plan is made: Ray places the replicas, and each GPU "
    "replica checks its model's estimate against its GPU before it loads."
)


def plan(**options) -> None:
    """Print the memory plan of a serve command line without loading anything: per model the estimate,
    per GPU the workers placed there and the headroom. Exit 2 with the reason when it does not fit.

    Takes serve's options. QIS_FAKE_GPUS=80GiB,24GiB plans for those GPUs instead, QIS_FAKE_HOST_MEMORY=16GiB
    for that much memory on this machine (planning and testing aids).
    """
    from .models.machine import FAKE_GPUS_ENV, FAKE_HOST_ENV, discover_gpus, parse_fake_gpus, parse_fake_host
    from .models.plan_result import PlanError
    from .models.planner import checked_plan

    logging.basicConfig(level=options["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        with start_paths():
            settings = settings_from_options(options)
            fake = os.environ.get(FAKE_GPUS_ENV)
            discover = (lambda: parse_fake_gpus(fake)) if fake else discover_gpus
            fake_host = os.environ.get(FAKE_HOST_ENV)
            host = (lambda: parse_fake_host(fake_host)) if fake_host else None
            specs = checked_specs(settings, cuda=bool(fake))
            if settings.engine == "ray":  # as serve: Ray places the replicas, each checks its own GPU
                typer.echo(RAY_PLAN.format(models=", ".join(spec.id for spec in specs)))
                return
            try:
                result = checked_plan(specs, settings, discover=discover, host=host)
            except PlanError as exc:
                typer.echo(exc.plan.table())
                raise
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(result.table())
    if result.check_failed:
        typer.echo("the plan does not fit; placed anyway (--memory-check warn)")
    else:
        typer.echo("placed without a memory check" if result.unchecked else "the plan fits")


def _name_environment_variables() -> None:
    """End each ``serve`` option's help with the environment variables of its setting (``[env: HOST, QIS_HOST]``) and
    its default when that is a plain value (``[default: 127.0.0.1]``), read from ``Settings``: the help and the settings cannot disagree. The annotations are evaluated once here, so
    that typer reads these very option objects (as strings, each reading would make new ones)."""
    serve.__annotations__ = typing.get_type_hints(serve, include_extras=True)
    for name, parameter in inspect.signature(serve).parameters.items():
        info = next((m for m in getattr(parameter.annotation, "__metadata__", ()) if isinstance(m, OptionInfo)), None)
        field = "models" if name == "model" else _RENAMED.get(name, name)
        if info is None or field not in Settings.model_fields:
            continue
        text = re.sub(r"\s*\[[A-Z][A-Z0-9_]*\]", "", info.help or "").rstrip()
        scoped = f"--{name}" in SCOPED_BOOLEAN_FLAGS or field in SCOPED_NUMBERS  # on|off@MODEL, N@MODEL: their own
        names = _env_names(field) + (_env_names(f"model_{field}") if scoped else [])
        default = Settings.model_fields[field].default  # a plain value's (none for lists, switches and unset ones)
        shown = f" [default: {default:g}]" if isinstance(default, float) else f" [default: {default}]"
        plain = isinstance(default, str | int | float | Path) and not isinstance(default, bool) and str(default) != ""
        info.help = f"{text} [env: {', '.join(names)}]" + (shown if plain else "")


_name_environment_variables()
cast(Any, plan).__signature__ = inspect.signature(serve, eval_str=True)  # the same options as serve, declared once
plan.__annotations__ = dict(serve.__annotations__)
app.command("plan", cls=_ServeCommand)(plan)


def main() -> None:
    app(prog_name="qwen-image-server")


if __name__ == "__main__":
    main()
