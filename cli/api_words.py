"""The engine's messages in the command line's words: `Budget.nvme` is `--nvme` to someone who typed a command.

The engine (offload) speaks its Python API, as it should for its own users: `Budget(device=..., nvme=...)`,
`Engine(max_grad_norm=...)`. Its checks already say what to change, so the CLI does not repeat them; it passes
their messages on where it calls the engine (cli/train.py, cli/hardware.py), with each API name replaced by the
flag that sets it. A name with no flag is left as it is.
"""

from __future__ import annotations

import re

__all__ = ["in_cli_words"]

_PHRASES = (
    # Longest first: a phrase is replaced before the names inside it.
    ("Budget.device + Budget.host", "--device-memory + --host-memory"),
    ("no NVMe directory was given", "no --nvme was given"),
    ("set Budget.nvme to a directory on a fast disk", "pass --nvme with a directory on a fast disk"),
    ("set Budget.nvme or raise the budgets", "pass --nvme with a directory on a fast disk, or raise --memory"),
    ("nowhere (no Budget.nvme)", "nowhere (no --nvme)"),
    ("resume with the swap directory and run name it was trained with", "resume with the --nvme and --output it "
                                                                         "was trained with"),
    ("raise the budgets", "raise --memory"),
    ("raise the device budget", "raise --device-memory"),
    ("raise the host budget", "raise --host-memory"),
    ("lower the prefetch depth", "lower --prefetch"),
    ("MeZO takes no accumulation_steps or max_grad_norm", "--optimizer mezo takes no --accumulation-steps or "
                                                          "--max-grad-norm"),
    ("MeZO needs compute_dtype=torch.float32", "--optimizer mezo needs --dtype float32"),
    ("MeZO(storage_dtype=torch.bfloat16)", "--storage-dtype bf16"),
    ("or None for no clipping", "or 0 for no clipping"),
)
_NAMES = (
    # An API name, then the flag; `name=value` becomes `--flag value`.
    (r"Budget\.device=?", "--device-memory "),
    (r"Budget\.host=?", "--host-memory "),
    (r"Budget\.nvme=?", "--nvme "),
    (r"\bmax_grad_norm=", "--max-grad-norm "),
    (r"\bprefetch=", "--prefetch "),
    (r"\baccumulation_steps=", "--accumulation-steps "),
    (r"\bquantize_frozen\b", "--qlora"),
)


def in_cli_words(message: str) -> str:
    """`message` (an engine error's) with the Python API's names of settings replaced by their flags, and the
    `Engine: ` its checks start with dropped (the CLI says which model it could not stream)."""
    message = message.removeprefix("Engine: ")
    for phrase, words in _PHRASES:
        message = message.replace(phrase, words)
    for pattern, flag in _NAMES:
        message = re.sub(pattern, flag, message)
    return re.sub(r" +", " ", message).replace(" )", ")").replace(" ;", ";").replace(" ,", ",").strip()
