"""File names from listings, as output names: which ones could lead out of their folder."""

from __future__ import annotations

import re


def is_absolute(name: str) -> bool:
    """An absolute path or a URL."""
    return name.startswith("/") or "://" in name


def leaves_root(name: str) -> bool:
    """Whether a file name could lead out of the folder it is joined to: absolute, a URL,
    or with a '..' part."""
    return is_absolute(name) or ".." in re.split(r"[/\\]", name)
