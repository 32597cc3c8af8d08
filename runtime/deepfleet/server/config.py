"""`deepfleet serve` settings: one pydantic model, filled from (lowest to highest precedence) the defaults,
a YAML or TOML file (`--config`), `DEEPFLEET_*` environment variables and command-line flags.

Environment: `DEEPFLEET_<FIELD>` for top-level fields, `DEEPFLEET_ENGINE__<FIELD>` for engine fields
(e.g. `DEEPFLEET_MAX_CONCURRENT=32`, `DEEPFLEET_ENGINE__MAX_NUM_SEQS=64`); values are parsed as YAML scalars.
Engine fields left unset take `EngineConfig`'s own defaults, so those live in one place (the engine).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deepfleet import defaults
from deepfleet.engine.spec_decode import config as spec_config
from deepfleet.security.keys import WeightsSettings
from deepfleet.server.auth.settings import AuditSettings, AuthSettings
from deepfleet.server.tls import TLSSettings

ENV_PREFIX = "DEEPFLEET_"


class EngineSettings(BaseModel):
    """Passed to the engine's EngineConfig; unset (null) means the engine's default."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        None, description="Weight and activation dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    device: str | None = Field(None, description="auto, cpu, cuda or cuda:N.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one engine step.")
    max_num_seqs_cap: int | None = Field(None, ge=1, description="Upper bound of the GPU's KV-sized max_num_seqs.")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="Token budget of one engine step.")
    block_size: int | None = Field(None, ge=1, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; unset = sized from free memory.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory the engine may use (weights + KV cache)."
    )
    enable_prefix_caching: bool | None = Field(None, description="Reuse KV blocks of shared prompt prefixes.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output; unset = the model's.")
    enforce_eager: bool | None = Field(None, description="Disable CUDA graphs.")
    grammar_compile_timeout_s: float | None = Field(
        None, gt=0, description="Structured output: a schema or grammar not compiled within this is refused (400)."
    )
    quantization: Literal["fp8"] | None = Field(
        None, description="fp8: quantize a bf16 checkpoint's weights to block FP8 on load; unset = as published."
    )
    kv_cache_dtype: Literal["auto", "fp8"] | None = Field(
        None, description="fp8: store keys/values in e4m3, half the bytes per token (not for MLA); unset = auto, "
        "the compute dtype."
    )
    load_format: Literal["auto", "dummy"] | None = Field(
        None, description="dummy: random weights of the checkpoint's shapes (benchmarks without the weight files)."
    )
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="GPUs one engine spans (one worker process per GPU, NCCL); set it to the GPUs the "
        "host or pod requests. Must divide the attention heads. Default 1."
    )
    expert_parallel: bool | None = Field(
        None, description="MoE models: split whole experts over the tensor-parallel ranks instead of each expert."
    )
    watermark_key: str | None = Field(
        None, min_length=1, description="Green-list watermark every output with this key (deepfleet watermark "
        "detect finds it); unset = off. Keep it secret: whoever holds it can detect and forge the mark."
    )
    collective_timeout_s: float | None = Field(
        None, gt=0, description="A worker silent (dead, hung, stuck in a collective) this long stops the server."
    )
    async_scheduling: bool | None = Field(
        None, description="Prepare the next engine step while the GPU runs this one (true unless set false)."
    )
    enable_lora: bool | None = Field(
        None, description="Serve LoRA adapters (PEFT format) beside the base model; implied by lora_modules."
    )
    max_loras: int | None = Field(
        None, ge=1, description=f"LoRA adapters resident at once, each usable in every batch (default "
        f"{defaults.MAX_LORAS}); more may be loaded: a request for one that is not resident takes the slot of the "
        "least recently used adapter that serves no unfinished request (503 while every slot does)."
    )
    max_lora_rank: int | None = Field(
        None, ge=1, description=f"Largest LoRA rank accepted (default {defaults.MAX_LORA_RANK}); adapter memory "
        "grows with it."
    )
    lora_modules: dict[str, str] | None = Field(
        None, description="LoRA adapters loaded at start-up: name -> PEFT adapter directory; requests select one "
        "by its name in `model`."
    )
    speculative: dict[str, Any] | None = Field(
        None, description="Speculative decoding, e.g. {method: ngram, num_speculative_tokens: 2}: method ngram "
        "(prompt lookup, any model; prompt_lookup_min/max) or mtp (DeepSeek-V3/R1's MTP layer); unset = off. "
        "Steps run serially while it is on."
    )

    @field_validator("speculative")
    @classmethod
    def _check_speculative(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        spec_config.parse(value)  # refuses naming engine.speculative.<key>
        return value

    def engine_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model directory (Hugging Face layout: config.json, *.safetensors, tokenizer).")
    served_model_name: str | None = Field(
        None, description="Model id in /v1/models and in requests' `model`; unset = the directory's name."
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(defaults.API_PORT, ge=1, le=65535, description="Port for the API, health and metrics.")
    max_concurrent: int | None = Field(
        None, ge=1, description="HTTP requests inside the engine at once (admission slots); unset = the engine's "
        f"max_num_seqs, so admission lets the engine fill its batch (the source documents use "
        f"{defaults.SOURCE_DOCS_MAX_CONCURRENT})."
    )
    max_queue: int = Field(64, ge=0, description="Requests that may wait for a slot; beyond that: refused.")
    queue_full_status: Literal[429, 503] = Field(429, description="HTTP status when the admission queue is full.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429/503 answers.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline from arrival: queue wait plus generation (finish_reason 'timeout')."
    )
    keep_alive_s: float = Field(
        75.0, gt=0, description="Idle keep-alive time of client connections; keep it above the load balancer's."
    )
    shutdown_grace_s: float = Field(
        defaults.SHUTDOWN_GRACE_S, ge=0, description="On SIGTERM: how long in-flight requests may take to finish."
    )
    engine_process: bool = Field(
        True, description="Run the engine in a child process of its own, so the HTTP event loop never waits for its "
        "Python work; false: in a thread of the server process (same results, lower throughput under load).",
    )
    api_processes: int | None = Field(
        None, ge=1, description="HTTP server processes in front of the one engine process (vLLM's "
        "--api-server-count), sharing the port (SO_REUSEPORT); admission slots and queue are split between them. "
        f"unset = min({defaults.API_PROCESSES_MAX}, CPUs // {defaults.CPUS_PER_API_PROCESS}) where a GPU is visible, "
        "else 1; 1 also while auth, LoRA or audit.max_bytes is on (not supported with several yet).",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per request).")
    reasoning_parser: Literal["deepseek_r1", "none"] = Field(
        "deepseek_r1", description="deepseek_r1: split <think>...</think> into reasoning_content; none: raw text."
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template file, or the template itself, served for every conversation "
        "instead of the model's own (vLLM's --chat-template); unset = the model's templates.",
    )
    generation_config: Literal["auto", "vllm"] = Field(
        "auto", description="auto: the model's generation_config.json sets temperature, top_p, top_k, min_p, "
        "repetition_penalty and max_tokens for requests that leave them out; vllm: the API defaults (vLLM's names).",
    )
    warmup_requests: int = Field(2, ge=0, description="Generation requests run before /readyz turns ready.")
    warmup_max_tokens: int = Field(8, ge=1, description="Tokens generated by each warm-up request.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine settings (see below).")
    # security sections (runtime/deepfleet/server/auth, server/tls.py, security/keys.py)
    auth: AuthSettings = Field(default_factory=AuthSettings, description="JWT authn, RBAC/ABAC, rate limits.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="Audit log.")
    tls: TLSSettings = Field(default_factory=TLSSettings, description="HTTPS, TLS 1.3 only; mutual TLS.")
    weights: WeightsSettings = Field(default_factory=WeightsSettings, description="Keys of encrypted weights.")

    @model_validator(mode="after")
    def _check_api_processes(self) -> ServeSettings:
        """Several API processes: the combinations that would be wrong with per-process state are refused."""
        n = self.api_processes
        if n is None or n == 1:
            return self
        why = None
        if not self.engine_process:
            why = "engine_process: false runs the engine inside the one server process"
        elif self.auth.enabled:
            why = ("auth is on: rate limits are counted per process (a principal would get api_processes x its "
                   "limit)")
        elif self.engine.enable_lora or self.engine.lora_modules:
            why = "LoRA is on: a runtime load or unload would reach one process's adapter list only"
        elif self.audit.max_bytes is not None:
            why = "audit.max_bytes is set: several processes would rotate the one audit log at once"
        elif self.max_concurrent is not None and self.max_concurrent < n:
            why = f"max_concurrent {self.max_concurrent} leaves some processes no admission slot"
        if why:
            raise ValueError(f"api_processes {n}: not supported while {why}; set api_processes: 1")
        return self

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    @field_validator("chat_template")
    @classmethod
    def _read_chat_template(cls, value: str | None) -> str | None:
        """A path is read here, and the template compiled, so a bad one stops start-up before the model loads."""
        if value is None:
            return None
        from jinja2 import TemplateSyntaxError

        from deepfleet.models.tokenizer import compile_template

        if "{{" not in value and "{%" not in value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"{value!r} is neither a readable file nor a Jinja template")
            value = path.read_text()
        try:
            compile_template(value)
        except TemplateSyntaxError as exc:
            raise ValueError(f"not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
        return value


# nested sections: file keys `auth.jwks_file`, environment `DEEPFLEET_AUTH__JWKS_FILE`
SECTIONS: dict[str, type[BaseModel]] = {"engine": EngineSettings, "auth": AuthSettings, "audit": AuditSettings,
                                        "tls": TLSSettings, "weights": WeightsSettings}


class SettingsError(ValueError):
    """A settings source (file, environment, flag) is invalid; the message names the field."""


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"--config {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except Exception as exc:
        raise SettingsError(f"--config {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: must hold a mapping of settings")
    return data


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """Only variables naming a known field are read: other DEEPFLEET_* variables belong to other tools."""
    out: dict[str, Any] = {}
    for name in ServeSettings.model_fields:
        if name not in SECTIONS and (value := env.get(ENV_PREFIX + name.upper())) is not None:
            out[name] = yaml.safe_load(value)
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            if (value := env.get(f"{ENV_PREFIX}{section.upper()}__{name.upper()}")) is not None:
                out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge, `top` winning."""
    merged = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if nested else value
    return merged


def parse_assignment(text: str) -> dict[str, Any]:
    """`engine.max_num_seqs=64` -> {"engine": {"max_num_seqs": 64}} (the value parsed as a YAML scalar)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SettingsError(f"--set {text!r}: expected KEY=VALUE")
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)
    return out


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> ServeSettings:
    data: dict[str, Any] = _read_file(config_file) if config_file else {}
    data = merge(data, _env_values(os.environ if env is None else env))
    data = merge(data, overrides or {})
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise SettingsError(problems) from exc


def settings_reference() -> str:
    """One line per field (for `--help` and runtime/README.md)."""
    lines = []
    for prefix, model in (("", ServeSettings), *((f"{name}.", m) for name, m in SECTIONS.items())):
        for name, f in model.model_fields.items():
            if not prefix and name in SECTIONS:
                continue
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"{prefix}{name} ({default}): {f.description}")
    return "\n".join(lines)
