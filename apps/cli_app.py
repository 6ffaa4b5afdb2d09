"""`residscope app`: serve the Streamlit explorer (`explorer_app.py`) with `streamlit run`, headless."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

ENTRY = Path(__file__).with_name("explorer_app.py")
ENV_MODEL = "RESIDSCOPE_EXPLORER_MODEL"  # read by explorer_cache.default_model


def streamlit_command(port: int, address: str | None = None) -> list[str]:
    """The `streamlit run` command line for the explorer (headless: it prints the URL instead of opening a browser)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(ENTRY), "--server.headless", "true", "--server.port", str(port),
           "--browser.gatherUsageStats", "false"]
    if address:
        cmd += ["--server.address", address]
    return cmd


def register(app: typer.Typer) -> None:
    @app.command("app")
    def serve(
        model: Optional[str] = typer.Option(None, "--model", help="Default model: alias, checkpoint folder or .gguf file "
                                                                   "(any other can be picked in the app)."),
        port: int = typer.Option(8501, "--port", help="Port to serve on."),
        address: Optional[str] = typer.Option(None, "--address", help="Address to bind (default: Streamlit's)."),
    ) -> None:
        """Open the Streamlit explorer: logit lens, attention, positional vectors, RoPE bound, pruning, extension."""
        if not 1 <= port <= 65535:
            raise InputError(f"--port must be in 1..65535, got {port}")
        env = dict(os.environ)
        if model is not None:
            if not model.strip():
                raise InputError("--model: empty model name")
            from residscope.model.registry import check_source

            check_source(model)  # a bad name fails here in one line, not as a page error in the server
            env[ENV_MODEL] = model
        typer.echo(f"residscope explorer on http://localhost:{port} (Ctrl+C to stop)")
        sys.stdout.flush()
        # exec, not a child process: Ctrl+C and SIGTERM reach streamlit itself, and its exit code is ours
        cmd = streamlit_command(port, address)
        os.execve(cmd[0], cmd, env)
