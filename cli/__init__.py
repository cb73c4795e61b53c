"""The `finetune` command line."""

__all__ = ["app"]


def __getattr__(name: str) -> object:
    """`app` is loaded on first use: the console script (cli/entry.py) must catch Ctrl-C around that import."""
    if name == "app":
        from .main import app

        return app
    raise AttributeError(name)
