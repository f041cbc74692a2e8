"""Server settings: one place for every environment variable and CLI option.

Command-line flags override the environment. Besides this project's own ``QIS_*`` variables, the names used by the two
documents the server grew from work as documented there: ``QWEN_IMAGE_LOCATION`` / ``QWEN_IMAGE_EDIT_LOCATION`` and
``MODEL_PATH``, ``MODEL_NAME``, ``NUM_GPUS_TO_USE``, ``TASK_QUEUE_SIZE``, ``TASK_TIMEOUT``, ``IMAGE_OUTPUT_DIR``,
``IMAGE_DOWNLOAD_URL_PREFIX``, plus ``HOST`` and ``PORT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import config_files as files
from .config_files import configured_entries, read_keys_file, repeated_entries, unique_entries
from .config_scoped import SCOPED_BOOLEANS, SCOPED_NUMBERS, SCOPED_PROFILE_FIELDS, PerModelLimits, split_items
from .config_urls import parse_prefix
from .limits import DEFAULT_SIDE, DEFAULT_STEPS, request_defaults


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(PerModelLimits, BaseSettings):
    """Everything the server can be told, from flags or the environment."""

    model_config = SettingsConfigDict(env_prefix="QIS_", extra="ignore", populate_by_name=True, allow_inf_nan=False)

    # --- what to serve -------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to serve, each `[ID=]PATH_OR_HUB_ID` (comma-separated in QIS_MODELS).",
    )
    # Seed 000 documents QWEN_IMAGE_*_LOCATION, and its Docker example uses MODEL_PATH_GENERATION/_EDIT.
    qwen_image_location: str | None = Field(default=None, validation_alias=_alias("QWEN_IMAGE_LOCATION", "MODEL_PATH_GENERATION"))
    qwen_image_edit_location: str | None = Field(
        default=None, validation_alias=_alias("QWEN_IMAGE_EDIT_LOCATION", "MODEL_PATH_EDIT")
    )
    model_path: str | None = Field(default=None, validation_alias=_alias("MODEL_PATH"))
    model_name: str | None = Field(default=None, validation_alias=_alias("MODEL_NAME"))
    demo: bool = False
    models_dir: Path | None = Field(
        default=None,
        description="When no model is named otherwise: serve every folder in it with a model_index.json, under its name.",
    )

    # --- network -----------------------------------------------------------------
    host: str = Field(default="127.0.0.1", validation_alias=_alias("HOST", "QIS_HOST"))
    port: int = Field(default=8000, ge=0, le=65535, validation_alias=_alias("PORT", "QIS_PORT"))
    # Connection guards of the embedded server (api/connections.py); Ray's proxy has its own.
    max_connections: int = Field(
        default=1000, ge=1, description="Connections served at once; requests on further ones get a JSON 503 with Retry-After."
    )
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request head (then 408 and close)."
    )
    body_timeout: float = Field(default=120.0, gt=0, description="Seconds a client has to send a request body after its head.")
    send_timeout: float = Field(default=60.0, gt=0, description="Seconds a client may read nothing of its answer (then closed).")
    keep_alive_timeout: float = Field(default=5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, description="Largest request head (request line and headers).")
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long running requests may finish; the rest get a JSON 503."
    )

    # --- engine ------------------------------------------------------------------
    workers: int = Field(default=1, ge=1, le=64, validation_alias=_alias("NUM_GPUS_TO_USE", "QIS_WORKERS"))
    # A model's own value of workers, queue_size, task_timeout or stuck_task_seconds: VALUE@MODEL (config_scoped.py).
    model_workers: Annotated[list[str], NoDecode] = Field(default_factory=list, description="N@MODEL: one model's workers.")
    queue_size: int = Field(default=32, ge=1, le=100_000, validation_alias=_alias("TASK_QUEUE_SIZE", "QIS_QUEUE_SIZE"))
    model_queue_size: Annotated[list[str], NoDecode] = Field(default_factory=list, description="N@MODEL: one model's queue.")
    task_timeout: float = Field(default=600.0, gt=0, validation_alias=_alias("TASK_TIMEOUT", "QIS_TASK_TIMEOUT"))
    model_task_timeout: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="S@MODEL: one model's task timeout."
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, or cuda:0,cuda:1,... (one entry per worker slot)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    memory_check: Literal["on", "warn", "off"] = Field(
        default="on",
        description="The memory plan before loading (models/planner.py): on refuses a plan that does not fit; warn "
        "logs the refusal and serves anyway; off places workers without checking any memory.",
    )
    max_batch_size: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Images of one request run together in one pipeline call, at most this many. "
        "1 keeps every image identical to a single-image request with its seed.",
    )
    share_components: bool = Field(
        default=False,
        description="Worker slot i of every model is one process: models take turns on its device, and text encoders "
        "and VAEs with the same files are loaded once (models/shared.py).",
    )
    cpu_threads: int | None = Field(
        default=None, ge=1, description="Torch threads per CPU worker; default: the machine's cores shared among CPU workers."
    )
    worker_restart_limit: int = Field(default=3, ge=0, description="Failed loads in a row before a model is marked failed.")
    worker_retry_seconds: float = Field(default=300.0, gt=0, description="How often a failed model is tried again.")
    stuck_task_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long a task told to stop (its timeout passed, or its client went away) may keep its worker "
        "before the worker process is killed and restarted, as one stuck in a call that never returns would be; "
        "0 never kills one.",
    )
    model_stuck_task_seconds: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="S@MODEL: one model's stuck_task_seconds."
    )
    worker_start: Literal["auto", "forkserver", "spawn"] = Field(
        default="auto",
        description="How worker processes start: forkserver forks them from a process that has imported torch and "
        "diffusers once (a start or restart in under a second); spawn starts a fresh interpreter each time. "
        "auto: forkserver for CPU workers, spawn for GPU workers.",
    )

    preview_scale: float = Field(
        default=1.0,
        ge=0.125,
        le=1.0,
        description="Stream previews (partial_images) are decoded by the VAE at this fraction of the image's side, "
        "then enlarged: at 0.5 a preview costs about a quarter of a full decode, but is a coarser and possibly "
        "colour-shifted picture; 1.0 (the default) decodes them at full size.",
    )

    # --- run profiles (see models/profile.py): each value VALUE or VALUE@MODEL_ID -------
    compile: bool | None = Field(default=None, description="Regional torch.compile of the transformer, warmed at start-up.")
    compile_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="WIDTHxHEIGHT,... warmed when compiling."
    )
    cache: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Step cache policy, e.g. fbcache:threshold=0.05."
    )
    quantize: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="none, fp8 or int4 (transformer linear layers)."
    )
    cfg_batch: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="auto, on or off: true CFG as one batch of two."
    )
    attention_backend: Annotated[list[str], NoDecode] = Field(default_factory=list, description="diffusers attention backend.")
    weights_dtype: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="auto or fp8 (FP8 storage, bf16 compute)."
    )
    offload: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="none, text-encoder, group, model, sequential."
    )
    vae_tiling: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="off or on: the VAE works on images in overlapping tiles (less memory)."
    )
    loras: Annotated[list[str], NoDecode] = Field(default_factory=list, description="LoRAs, each NAME=PATH[@MODEL].")
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ALIAS=NAME: another name of a served model or LoRA id (e.g. dall-e-3=qwen-image; ';'-separated "
        "in the environment).",
    )
    deterministic: bool | None = Field(
        default=None,
        description="Deterministic CUDA arithmetic (torch deterministic algorithms, no TF32, no cuDNN autotuning); slower.",
    )
    model_compile: Annotated[list[str], NoDecode] = Field(default_factory=list, description="on|off@MODEL: one model's compile.")
    model_deterministic: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="on|off@MODEL: one model's deterministic mode."
    )

    # --- access ------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        validation_alias=_alias("QWEN_IMAGE_API_KEYS", "QIS_API_KEYS"),
        description="Keys clients must send as 'Authorization: Bearer KEY' (comma-separated in the environment).",
    )
    api_keys_file: Path | None = Field(default=None, description="A file of API keys, one per line (# comments).")
    public_ready_detail: bool = Field(
        default=False, description="With API keys: show /ready's per-worker detail to callers without a key too."
    )
    public_metrics: bool = Field(default=False, description="With API keys: let callers without a key read /metrics too.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Web page origins allowed to call the API (comma-separated; * for any)."
    )

    # --- Ray Serve engine ---------------------------------------------------------------
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(default=None, description="Ray cluster to join (ray://... or auto); none: start a local one.")
    ray_app_name: str = "qwen-image-server"
    ray_min_replicas: int = Field(default=1, ge=0)
    ray_max_replicas: int | None = Field(default=None, ge=1, description="Default: --workers.")
    ray_gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per model replica: 1, a fraction (replicas share a GPU) or 0 (the CPU). Default: from --device "
        "(cpu: 0, cuda: 1; auto: 1 when the Ray cluster has GPUs, or this machine before Ray starts).",
    )
    model_ray_gpus_per_replica: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="S@MODEL: one model's GPUs per Ray replica (0 to 1)."
    )
    ray_cpus_per_replica: float = Field(default=1.0, ge=0)

    # --- images ------------------------------------------------------------------
    image_output_dir: Path = Field(
        default=Path("./generated_images"), validation_alias=_alias("IMAGE_OUTPUT_DIR", "QIS_IMAGE_OUTPUT_DIR")
    )
    image_download_url_prefix: str | None = Field(
        default=None, validation_alias=_alias("IMAGE_DOWNLOAD_URL_PREFIX", "QIS_IMAGE_DOWNLOAD_URL_PREFIX")
    )
    image_max_files: int = Field(default=10_000, ge=1, description="Stored url-format images kept; the oldest go first.")
    image_ttl_seconds: float = Field(default=24 * 3600, gt=0, description="Stored url-format images older than this are deleted.")

    # --- S3-compatible storage for url images (instead of image_output_dir) ------------------
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = ""
    s3_presign: bool = Field(default=False, description="Return presigned URLs instead of serving images at /images/{name}.")
    s3_presign_expiry: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    s3_timeout: float = Field(default=10.0, gt=0, le=600, description="Seconds to connect to the bucket, and between its bytes.")

    # --- prompt rewriting (seed 002) ---------------------------------------------------
    enable_prompt_rewrite: bool = Field(
        default=False, validation_alias=_alias("ENABLE_PROMPT_REWRITE", "QIS_ENABLE_PROMPT_REWRITE")
    )
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=_alias("OPENAI_API_KEY", "QIS_OPENAI_API_KEY"))
    #: None (unset or blank): OpenAI's own endpoint, ``DEFAULT_OPENAI_BASE_URL``
    openai_base_url: str | None = Field(default=None, validation_alias=_alias("OPENAI_BASE_URL", "QIS_OPENAI_BASE_URL"))
    openai_model: str = Field(default="gpt-4o-mini", validation_alias=_alias("OPENAI_MODEL", "QIS_OPENAI_MODEL"))
    rewrite_timeout: float = Field(default=20.0, gt=0, description="Seconds per rewrite attempt.")
    rewrite_retries: int = Field(default=1, ge=0, le=5)

    # --- request limits ------------------------------------------------------------
    default_size: str = Field(
        default=f"{DEFAULT_SIDE}x{DEFAULT_SIDE}",
        description="Size used when a request gives none (a model may set its own). Not given: 1024x1024, or the "
        "nearest square the side limits allow.",
    )
    default_steps: int = Field(
        default=DEFAULT_STEPS,
        ge=1,  # at most QIS_MAX_STEPS (``_check_sides``)
        description="Steps of a request that gives none. Not given: 50, or QIS_MAX_STEPS when lower.",
    )
    default_true_cfg_scale: float = Field(default=4.0, ge=0.0, le=20.0)
    min_image_side: int = Field(default=256, ge=16)
    max_image_side: int = Field(default=2048, ge=16)
    max_steps: int = Field(default=100, ge=2, le=1000)  # requests' num_inference_steps start at 2
    max_n: int = Field(default=10, ge=1, le=100)
    max_prompt_chars: int = Field(default=4000, ge=1)
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    max_input_images: int = Field(default=4, ge=1, le=16)
    image_url_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="URL prefixes input images may be fetched from (comma-separated); none: no URLs."
    )
    image_url_timeout: float = Field(default=10.0, gt=0, le=600, description="Seconds to fetch all of a request's URL images.")
    # --- memory of the API process (serving/inputs.py, engine/admission.py) ---------------
    max_concurrent_decodes: int | None = Field(
        default=None, ge=1, description="Requests whose uploads are decoded at the same time; default: 2 per CPU core."
    )
    max_queued_pixel_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1, description="Input pixel bytes one model's queued and running jobs may hold (503 above)."
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings  # no .env file, no secrets folder: passes over them cost half of Settings()

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("image_output_dir", mode="before")
    @classmethod
    def _output_dir_usable(cls, value: object) -> object:
        return files.checked_output_dir(value, cls.model_fields["image_output_dir"].default)

    @field_validator("image_download_url_prefix", "s3_endpoint_url", "s3_bucket")
    @classmethod
    def _places(cls, value: str | None, info: ValidationInfo) -> str | None:
        return files.checked_place(str(info.field_name), value)  # URLs and a bucket's name that can work

    @field_validator("openai_base_url", "openai_api_key", "openai_model", "models_dir", "api_keys_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """Blank is unset: the default (compose's ``${VAR:-}``); whitespace dropped (a bad URL: ``_check_sides``,
        ``make_rewriter``)."""
        return (value.strip() or cls.model_fields[str(info.field_name)].default) if isinstance(value, str) else value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if not parts and value.strip() and info.field_name == "api_keys":
                return [""]  # QIS_API_KEYS=" , ": keys meant but none given (refused below)
            value = parts
        if info.field_name == "cors_origins" and isinstance(value, list):  # as browsers send Origin, or refused
            return [files.checked_origin(str(origin)) for origin in value]
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_blank_key(cls, keys: list[str]) -> list[str]:
        """A blank key (``--api-key ''``, ``QIS_API_KEYS=" , "``) would turn keys off or let no client in: refused."""
        if any(not key.strip() for key in keys):
            raise ValueError("an API key is empty (give every key, or none to serve without keys)")
        return [files.checked_key(key.strip()) for key in keys]

    @field_validator("host")
    @classmethod
    def _host_given(cls, value: str) -> str:
        return files.checked_host(value)  # not empty, an IPv6 address without its URL brackets

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return files.checked_device(value.lower())  # auto, or cpu, cuda and cuda:N (one per worker slot)

    @field_validator("dtype", "memory_check", "worker_start", "engine", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value  # as the profile settings' words are read

    @field_validator("image_url_prefixes", mode="before")
    @classmethod
    def _fetchable_prefixes(cls, value: object) -> object:
        if isinstance(value, str):  # comma-separated in the environment
            value = [part for part in value.split(",") if part.strip()]
        return [str(parse_prefix(str(prefix))) for prefix in value] if isinstance(value, list) else value

    def all_api_keys(self) -> list[str]:
        """The keys given directly and those in the keys file."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += read_keys_file(self.api_keys_file)
        return keys

    @field_validator(*SCOPED_PROFILE_FIELDS, "model_compile", "model_deterministic", "loras", "model_aliases", mode="before")
    @classmethod
    def _split_scoped(cls, value: object) -> object:
        # one value, or several separated by ';' (values may hold commas: QIS_COMPILE_SIZES=1024x1024,1328x1328@m;...)
        if isinstance(value, str):
            return [part.strip() for part in value.split(";") if part.strip()]
        return value

    @field_validator(*(setting.scoped_field for setting in SCOPED_NUMBERS.values()), mode="before")
    @classmethod
    def _split_scoped_numbers(cls, value: object, info: ValidationInfo) -> object:
        value = split_items(value)  # QIS_MODEL_WORKERS=3@qwen-image;1@qwen-image-edit
        setting = next(s for s in SCOPED_NUMBERS.values() if s.scoped_field == info.field_name)
        for item in value if isinstance(value, list) else []:
            setting.parse(item)
        return value

    def profile_flags(self) -> dict[str, list[str]]:
        """The run-profile values given by flags or the environment, by profile key."""
        flags = {key: list(getattr(self, key)) for key in SCOPED_PROFILE_FIELDS}
        for key in SCOPED_BOOLEANS:  # the value for every model, then the ones for one model
            value = getattr(self, key)
            flags[key] = ([] if value is None else [str(value)]) + list(getattr(self, f"model_{key}"))
        return flags

    @model_validator(mode="after")
    def _check_sides(self) -> Settings:
        given = self.model_fields_set
        self.default_size, self.default_steps = request_defaults(
            self.min_image_side,
            self.max_image_side,
            self.max_steps,
            self.default_size if "default_size" in given else None,
            self.default_steps if "default_steps" in given else None,
        )
        if self.ray_max_replicas is None:
            self.ray_max_replicas = max(self.workers, self.ray_min_replicas)
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("QIS_RAY_MIN_REPLICAS must not exceed QIS_RAY_MAX_REPLICAS (by default --workers)")
        if self.engine == "ray" and (self.ray_gpus_per_replica or 0) > 1:  # (the embedded engine does not read it)
            raise ValueError(
                f"--ray-gpus-per-replica (QIS_RAY_GPUS_PER_REPLICA) {self.ray_gpus_per_replica:g}: a replica runs on one GPU; "
                "give 1, a share of one, or 0"
            )
        if self.enable_prompt_rewrite and self.openai_base_url is not None:  # (else a bad one is a warning)
            files.checked_base_url(self.openai_base_url, "OPENAI_BASE_URL (with ENABLE_PROMPT_REWRITE): ")
        return self

    def model_entries(self) -> list[tuple[str | None, str]]:
        """All models to serve as ``(id or None, path or hub id)``, in order, without repeats: a source given twice
        (``--model`` and ``MODEL_PATH``, say) is served once (``config_files.unique_entries``)."""
        return unique_entries(configured_entries(self))

    def repeated_sources(self) -> list[tuple[str, str]]:
        """``(id, source)`` of each repeat that ``model_entries`` leaves out and that names an id of its own
        (``--model a=X --model b=X``): the server answers to it as another name of the model it serves from X
        (``config_files.repeated_entries``)."""
        return repeated_entries(configured_entries(self))
