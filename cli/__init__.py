"""The `finetune` command line."""

from cli.main import app

__all__ = ["app"]
