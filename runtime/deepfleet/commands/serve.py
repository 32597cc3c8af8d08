"""`deepfleet serve MODEL_DIR`: the OpenAI-compatible HTTP server (see runtime/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deepfleet.server.config import SettingsError, load_settings, merge, parse_assignment, settings_reference

_EPILOG = (
    "Settings (file keys; env DEEPFLEET_<KEY>, DEEPFLEET_ENGINE__<KEY>; flag --set KEY=VALUE):\n\n"
    + "\n\n".join(settings_reference().splitlines())
)


def _lora_modules(items: list[str]) -> dict[str, str]:
    """--lora-modules values (NAME=PATH or {"name": ..., "path": ...}) -> name -> path."""
    modules: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise typer.BadParameter(f"{item!r}: expected {{\"name\": ..., \"path\": ...}} ({exc})",
                                         param_hint="--lora-modules") from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise typer.BadParameter(f"{item!r}: expected NAME=PATH", param_hint="--lora-modules")
        if name in modules:
            raise typer.BadParameter(f"{name!r} given twice", param_hint="--lora-modules")
        modules[name] = path
    return modules


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the root app."""

    @app.command("serve", epilog=_EPILOG)
    def serve(
        model_dir: Annotated[Path, typer.Argument(help="Model directory (config.json, *.safetensors, tokenizer).")],
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML settings file.")] = None,
        host: Annotated[str | None, typer.Option(help="Address to listen on (setting: host).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (setting: port).")] = None,
        served_model_name: Annotated[
            str | None, typer.Option(help="Model id clients send (setting: served_model_name).")
        ] = None,
        max_concurrent: Annotated[int | None, typer.Option(help="Admission slots (setting: max_concurrent).")] = None,
        api_processes: Annotated[int | None, typer.Option(
            help="HTTP server processes in front of the engine, as vLLM's --api-server-count (setting: "
            "api_processes).")] = None,
        generation_config: Annotated[
            str | None, typer.Option(help="auto: the model's generation_config.json defaults; vllm: the API's.")
        ] = None,
        # vLLM's flag names, same meaning (settings engine.*, tls.*)
        dtype: Annotated[str | None, typer.Option(help="auto, bfloat16, float16, float32 (engine.dtype).")] = None,
        max_model_len: Annotated[
            int | None, typer.Option(help="Longest prompt + output (engine.max_model_len).")
        ] = None,
        gpu_memory_utilization: Annotated[
            float | None, typer.Option(help="Share of GPU memory to use (engine.gpu_memory_utilization).")
        ] = None,
        max_num_seqs: Annotated[int | None, typer.Option(help="Sequences per step (engine.max_num_seqs).")] = None,
        max_num_batched_tokens: Annotated[
            int | None, typer.Option(help="Token budget per step (engine.max_num_batched_tokens).")
        ] = None,
        block_size: Annotated[int | None, typer.Option(help="Tokens per KV block (engine.block_size).")] = None,
        enable_prefix_caching: Annotated[
            bool | None, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching",
                                      help="Reuse KV of shared prefixes (engine.enable_prefix_caching).")
        ] = None,
        enforce_eager: Annotated[
            bool | None, typer.Option("--enforce-eager", help="No CUDA graphs (engine.enforce_eager).")
        ] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (engine.device).")] = None,
        quantization: Annotated[
            str | None, typer.Option(help="fp8: quantize weights to block FP8 on load (engine.quantization).")
        ] = None,
        kv_cache_dtype: Annotated[
            str | None, typer.Option(help="auto or fp8: KV cache in e4m3, half the bytes (engine.kv_cache_dtype).")
        ] = None,
        tensor_parallel_size: Annotated[int | None, typer.Option(
            "--tensor-parallel-size", "-tp",
            help="GPUs the engine spans, one worker process per GPU (engine.tensor_parallel_size).")] = None,
        enable_lora: Annotated[
            bool | None, typer.Option("--enable-lora", help="Serve LoRA adapters (engine.enable_lora).")
        ] = None,
        lora_modules: Annotated[list[str] | None, typer.Option(
            "--lora-modules", help="A LoRA adapter loaded at start-up, NAME=PATH or vLLM's JSON "
            '{"name": ..., "path": ...}; repeat the flag for more (engine.lora_modules).')] = None,
        max_loras: Annotated[
            int | None, typer.Option(help="LoRA adapters resident at once (engine.max_loras).")
        ] = None,
        max_lora_rank: Annotated[
            int | None, typer.Option(help="Largest LoRA rank accepted (engine.max_lora_rank).")
        ] = None,
        speculative_method: Annotated[str | None, typer.Option(
            help="ngram or mtp: speculative decoding (engine.speculative.method).")] = None,
        num_speculative_tokens: Annotated[int | None, typer.Option(
            help="Drafts per step with --speculative-method (engine.speculative.num_speculative_tokens).")] = None,
        load_format: Annotated[str | None, typer.Option(
            help="auto, or dummy: random weights of the checkpoint's shapes (engine.load_format).")] = None,
        chat_template: Annotated[str | None, typer.Option(
            help="Jinja chat template file (or the template itself) instead of the model's (chat_template).")] = None,
        reasoning_parser: Annotated[str | None, typer.Option(
            help="deepseek_r1: <think>...</think> into reasoning_content; none: raw text (reasoning_parser).")] = None,
        ssl_certfile: Annotated[Path | None, typer.Option(
            help="PEM certificate chain: serve HTTPS, TLS 1.3 only (tls.cert_file).")] = None,
        ssl_keyfile: Annotated[Path | None, typer.Option(
            help="PEM private key of --ssl-certfile (tls.key_file).")] = None,
        ssl_ca_certs: Annotated[Path | None, typer.Option(
            help="PEM CA bundle: clients must present a certificate it signed (tls.client_ca_file).")] = None,
        set_: Annotated[
            list[str] | None, typer.Option("--set", help="Any setting, e.g. --set engine.max_num_seqs=64 (repeat).")
        ] = None,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print merged settings, exit.")] = False,
    ) -> None:
        """Serve MODEL_DIR over the OpenAI API (chat, completions, models), with /healthz, /readyz, /metrics.

        Precedence: defaults < --config file < DEEPFLEET_* environment < flags.
        """
        overrides: dict = {}
        try:
            for item in set_ or []:
                overrides = merge(overrides, parse_assignment(item))
            flags = {"host": host, "port": port, "served_model_name": served_model_name,
                     "max_concurrent": max_concurrent, "api_processes": api_processes,
                     "generation_config": generation_config,
                     "reasoning_parser": reasoning_parser, "chat_template": chat_template}
            engine_flags = {"dtype": dtype, "max_model_len": max_model_len,
                            "gpu_memory_utilization": gpu_memory_utilization, "max_num_seqs": max_num_seqs,
                            "max_num_batched_tokens": max_num_batched_tokens, "block_size": block_size,
                            "enable_prefix_caching": enable_prefix_caching, "enforce_eager": enforce_eager,
                            "device": device, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
                            "tensor_parallel_size": tensor_parallel_size, "enable_lora": enable_lora,
                            "max_loras": max_loras, "max_lora_rank": max_lora_rank, "load_format": load_format,
                            "lora_modules": _lora_modules(lora_modules) if lora_modules else None}
            overrides.update({k: v for k, v in flags.items() if v is not None})
            tls = {k: str(v) for k, v in {"cert_file": ssl_certfile, "key_file": ssl_keyfile,
                                          "client_ca_file": ssl_ca_certs}.items() if v is not None}
            if tls:
                overrides["tls"] = {**overrides.get("tls", {}), **tls}
            engine = {k: v for k, v in engine_flags.items() if v is not None}
            if speculative_method is not None or num_speculative_tokens is not None:
                if speculative_method is None:
                    raise typer.BadParameter("--num-speculative-tokens needs --speculative-method (ngram or mtp)")
                speculative = {"method": speculative_method}
                if num_speculative_tokens is not None:
                    speculative["num_speculative_tokens"] = num_speculative_tokens
                engine["speculative"] = speculative
            if engine:
                overrides["engine"] = {**overrides.get("engine", {}), **engine}
            overrides["model"] = str(model_dir)
            settings = load_settings(config, overrides)
        except SettingsError as exc:
            raise typer.BadParameter(str(exc)) from None
        if print_config:
            typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2))
            return
        if not model_dir.is_dir():
            raise typer.BadParameter(f"{model_dir}: not a directory", param_hint="MODEL_DIR")
        from deepfleet.security.errors import SecurityConfigError
        from deepfleet.security.serving import check_model_source
        from deepfleet.server.auth.guard import exposure_warnings
        from deepfleet.server.lifecycle import run

        for warning in exposure_warnings(settings):
            typer.secho(warning, err=True, fg="red", bold=True)
        try:  # JWKS, policy, audit path, certificates and the weights' key are all checked before the port opens
            check_model_source(settings.model, settings.weights)
            status = run(settings)
        except SecurityConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(status)

