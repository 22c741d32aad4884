"""Optional libraries for reading more input formats, named by the extra that installs them."""

from __future__ import annotations

import importlib

from marjara.errors import MarjaraError

# module: (what needs it, the pyproject extra that installs it)
OPTIONAL = {
    "pyarrow": (".parquet inputs", "data"),
    "zstandard": (".jsonl.zst inputs", "data"),
}


def require(module: str):
    """Import an optional module, or one MarjaraError line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        needs, extra = OPTIONAL[package]
        raise MarjaraError(
            f"reading {needs} needs the {package} package, which is not installed; "
            f"install the {extra!r} extra: pip install -e '.[{extra}]'"
        ) from None
