"""`deepfleet serve-models` (KServe v2 server for a model repository), `build-trt-engine`, `example-models`."""

from pathlib import Path
from typing import Annotated

import typer

from deepfleet.defaults import API_PORT


def register(app: typer.Typer) -> None:
    @app.command("serve-models")
    def serve_models(
        repository: Annotated[Path, typer.Argument(help="Model repository: one directory per model with config.yaml.")],
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = API_PORT,
        max_body_mb: Annotated[float, typer.Option(help="Largest accepted request body, MiB (larger: 413).")] = 16.0,
    ) -> None:
        """Serve the repository's models with dynamic batching over the KServe v2 protocol."""
        import uvicorn

        from deepfleet.batching.app import create_app_from_repository
        from deepfleet.batching.errors import ConfigError

        try:
            app = create_app_from_repository(repository, int(max_body_mb * 1024 * 1024))
        except ConfigError as exc:
            raise typer.BadParameter(exc.message, param_hint="REPOSITORY") from None
        uvicorn.run(app, host=host, port=port, log_level="warning")

    @app.command("build-trt-engine")
    def build_trt_engine(
        model_dir: Annotated[Path, typer.Argument(help="Model directory whose config.yaml gives names and dims.")],
        onnx: Annotated[Path, typer.Option(help="ONNX export of the model (torch.onnx.export).")] = Path("model.onnx"),
        plan: Annotated[Path, typer.Option(help="Engine file to write.")] = Path("model.plan"),
        fp16: Annotated[bool, typer.Option(help="Allow FP16 kernels.")] = True,
    ) -> None:
        """Compile an ONNX model into a TensorRT engine (needs the tensorrt package: GPU hosts only). Relative
        --onnx/--plan paths are inside MODEL_DIR; the optimization profile comes from its config."""
        from deepfleet.batching.backends.tensorrt import build_engine
        from deepfleet.batching.errors import BatchingError
        from deepfleet.batching.repository import read_config

        try:
            written = build_engine(model_dir / onnx, model_dir / plan, read_config(model_dir), fp16=fp16)
        except BatchingError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {written}")

    @app.command("example-models")
    def example_models(
        directory: Annotated[Path, typer.Argument(help="Where to write the example repository.")],
    ) -> None:
        """Write a model repository with two small ONNX models (a classifier and a bucketed embedder)."""
        from deepfleet.batching.examples import write_example_repository

        write_example_repository(directory)
        typer.echo(f"wrote {directory}: serve it with `deepfleet serve-models {directory}`")
