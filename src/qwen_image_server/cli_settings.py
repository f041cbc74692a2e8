"""``Settings`` from the command line's options, and settings errors named as the user set them (the flag, or the
environment variables): shared by ``serve`` and ``plan`` in ``cli.py``. With them, the environment's side of the
settings that ``ray_app.py`` checks too: the variables a setting also goes by, and the two API-key variables."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping

import typer
from pydantic import AliasChoices, ValidationError

from .config import Settings
from .config_files import shown_url
from .config_scoped import SCOPED_NUMBERS, split_flag_values
from .models.tiny import demo_model_entries

#: Command-line options that are Settings fields of another name.
RENAMED = {
    "image_url_prefix": "image_download_url_prefix",
    "lora": "loras",
    "model_alias": "model_aliases",
    "api_key": "api_keys",
    "cors_origin": "cors_origins",
    "compile_for": "model_compile",  # --compile on|off@MODEL (cli.scoped_boolean_args)
    "deterministic_for": "model_deterministic",
}


def settings_from_options(options: dict) -> Settings:
    """``Settings`` from the options of ``serve`` (and ``plan``, which takes the same): flags override the environment."""
    overrides = {RENAMED.get(key, key): value for key, value in options.items() if key not in ("model", "log_level")}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    for setting in SCOPED_NUMBERS.values():  # --workers N (every model) and --workers N@MODEL (one model)...
        if setting.field in overrides:
            plain, scoped = split_flag_values(overrides.pop(setting.field))
            if plain is not None:  # a value for every model replaces the environment's per-model ones too, as a
                overrides[setting.field] = plain  # profile flag (--offload none) does
            if scoped or plain is not None:
                overrides[setting.scoped_field] = scoped
    if options.get("model"):
        overrides["models"] = list(options["model"])
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ValueError(settings_problem(exc, set(overrides))) from None
    check_key_variables(os.environ, "api_keys" in overrides)
    replaced = keys_replaced_by_flag("api_keys" in overrides, os.environ)
    if replaced:
        logging.getLogger(__name__).warning(replaced)
    if settings.model_name and not settings.model_path:
        logging.getLogger(__name__).warning(
            "MODEL_NAME=%s is set without MODEL_PATH: it names MODEL_PATH's model only, so it is not used "
            "(--model-alias %s=MODEL gives a served model that name)",
            settings.model_name,
            settings.model_name,
        )
    if settings.demo:  # --demo/--no-demo over QIS_DEMO
        settings.models = demo_model_entries() + settings.models
    return settings


def keys_replaced_by_flag(flag_given: bool, environ: Mapping[str, str]) -> str | None:
    """The warning for API keys in the environment that ``--api-key`` replaces (a flag overrides its variables; the
    keys are not merged, so clients sending those get 401), or None. The keys themselves are never shown."""
    unused = [name for name, keys in key_variables(environ).items() if keys]
    if not flag_given or not unused:
        return None
    return f"--api-key replaces the keys in {' and '.join(unused)}: only the --api-key keys (and --api-keys-file's) are accepted"


def settings_problem(exc: ValidationError, given: set[str], given_as: Callable[[str], str] | None = None) -> str:
    """The invalid settings, one per line, each named as the user set it: its flag (or ``given_as(field)`` for the
    fields in ``given``), or its environment variables. No value of a key, secret or token is shown, nor the
    credentials or query of a URL (``config_files.shown_url``)."""
    flags = {field: given_as(field) for field in given} if given_as else _flags_of_fields()
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        secret = any(word in field.lower() for word in ("key", "secret", "token"))
        if isinstance(value, str) and ("url" in field or "://" in value):
            value = shown_url(value)
        got = f" (got {value!r})" if field and not secret and isinstance(value, str | int | float) else ""
        got = "" if repr(value) in message or _names(message, str(value)) else got  # the message names it already
        if not field:  # a rule between settings: its message names them
            lines.append(message)
        elif field in given:
            lines.append(f"{flags.get(field, '--' + field.replace('_', '-'))}: {message}{got}")
        else:  # from the environment: every variable name of the setting (pydantic names the first alias)
            lines.append(f"{' or '.join(env_names(field))}: {message}{got}")
    return "invalid settings:\n" + "\n".join(f"  {line}" for line in lines)


def _flags_of_fields() -> dict[str, str]:
    """The flag of ``serve`` that sets each Settings field, as its help spells it (``--shutdown-grace``)."""
    from .cli import app  # the command line this module reads its options from (imported when first needed)

    command = typer.main.get_command(app)
    serve_command = getattr(command, "commands", {}).get("serve", command)  # typer's own click classes: no isinstance
    flags = {}
    for param in serve_command.params:
        if getattr(param, "param_type_name", "") == "option" and param.name:
            long = [opt for opt in param.opts if opt.startswith("--")]
            flags[RENAMED.get(param.name, param.name)] = (long or param.opts)[0]
    for setting in SCOPED_NUMBERS.values():
        flags[setting.scoped_field] = flags[setting.field]  # --workers N@MODEL...
    flags.update(model_compile="--compile", model_deterministic="--deterministic")  # --compile on|off@MODEL
    return flags


def env_names(field: str) -> list[str]:
    """The environment variables of the setting named ``field`` or one of its aliases."""
    for name in Settings.model_fields:
        choices = alias_names(name)
        if field == name or field in choices:
            return choices or [f"QIS_{name.upper()}"]
    return [field]


def _names(message: str, value: str) -> bool:
    """Whether ``message`` has ``value`` as a word of its own (a path it names; not 100 inside "at most 1000")."""
    return bool(value) and re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", message) is not None


def alias_names(field: str) -> list[str]:
    """The environment variables (and Ray args) a Settings field also goes by, first read first; [] for none."""
    alias = Settings.model_fields[field].validation_alias
    return [str(name) for name in alias.choices] if isinstance(alias, AliasChoices) else []


def key_variables(environ: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """The API-key variables set in ``environ`` (names in any case, as the settings read them; their order), with keys."""
    names = alias_names("api_keys")
    given = {variable.upper(): value for variable, value in environ.items() if variable.upper() in names}
    return {name: frozenset(key.strip() for key in given[name].split(",") if key.strip()) for name in names if name in given}


def check_key_variables(environ: Mapping[str, str], flag_given: bool) -> None:
    """Refuse (``ValueError``, as an invalid setting) both variables of the API keys set to different keys: only the
    first would be read (they are not merged), so a key meant to be required would not be, and an empty
    ``QWEN_IMAGE_API_KEYS`` beside a set ``QIS_API_KEYS`` served with no key at all. Nothing to refuse when keys are
    given directly (``flag_given``: ``--api-key``, a Ray app's ``api_keys``), which replace both. No key is shown."""
    given = key_variables(environ)
    if not flag_given and len(set(given.values())) > 1:
        first = next(iter(given))  # (both are set: the first the settings read)
        raise ValueError(
            f"invalid settings:\n  {' and '.join(given)} are both set, to different keys: only {first} would be read "
            "(they are not merged); keep one of them"
        )
