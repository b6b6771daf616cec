"""Loading checkpoints users bring without letting the file run code.

``torch.load(weights_only=False)`` unpickles arbitrary objects, and unpickling can call any importable
function: a ``.pth`` downloaded from anywhere could delete files or open a shell. :func:`safe_torch_load`
always loads with ``weights_only=True`` (tensors, containers, numbers, strings only), admits exactly the
extra types a caller lists (for official files that pickle, e.g., an ``argparse.Namespace``), and refuses
anything else with :class:`UntrustedCheckpointError` naming the file and the type. Full unpickling happens
only on an explicit ``trust_pickle=True`` (CLIs spell it ``--trust-pickle``).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["UntrustedCheckpointError", "safe_torch_load"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object outside the allowed types; it was not unpickled.

    Attributes:
        source: The file.
        type_name: The refused global (``module.qualname``), or ``""`` if torch did not name one.
    """

    def __init__(self, source: str, type_name: str, detail: str) -> None:
        what = f"type {type_name}" if type_name else f"an object ({detail})"
        super().__init__(
            f"{source}: refusing to unpickle {what}: checkpoints are loaded with weights_only=True so that a "
            f"file cannot run code; if you trust where this file came from, pass trust_pickle=True "
            f"(--trust-pickle on the command line)")
        self.source, self.type_name = source, type_name


def safe_torch_load(source: str | Path | BinaryIO, map_location: Any = "cpu",
                    allowed_globals: Sequence[Any] = (), trust_pickle: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` that never executes code from the file unless the caller trusts it.

    Args:
        source: Checkpoint path or open binary file.
        map_location: As for ``torch.load``.
        allowed_globals: Classes / functions the file may reference beyond what ``weights_only`` allows
            (scoped to this call with ``torch.serialization.safe_globals``; nothing global is changed).
        trust_pickle: Unpickle everything (``weights_only=False``): only for files from a trusted source.
        mmap: Map the file's tensors instead of reading them (``torch.load(mmap=True)``): loading only some
            of a large checkpoint's tensors then reads only those.

    Returns:
        The loaded object.

    Raises:
        UntrustedCheckpointError: The file references a type that is not allowed (nothing was executed).
        ValueError: The file is not a readable torch checkpoint (truncated, not a checkpoint).
        FileNotFoundError: The path does not exist.
    """
    name = str(source) if isinstance(source, str | Path) else str(getattr(source, "name", "<file>"))
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    if trust_pickle:
        warnings.warn(f"{name}: unpickling with weights_only=False (trust_pickle=True); the file can run code",
                      stacklevel=2)
        return torch.load(source, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise UntrustedCheckpointError(name, found.group(1) if found else "", detail) from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{name}: cannot read checkpoint: {type(e).__name__}: {e}") from e
