"""The demo corpus, built at run time from text every Python installation ships (never committed).

- `python_code`: each standard-library package's source files concatenated in path order, one document
  per package (the shape of repository-concatenated code corpora).
- `python_docs`: long English documentation: the language-reference topics of `pydoc_data` as one
  document, plus the plain-text `pydoc` rendering of a fixed list of modules, one document each.

The text depends on the Python version, which the prepare stage puts in its fingerprint.
"""

from __future__ import annotations

import importlib
import io
import logging
import pydoc
import re
import sysconfig
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from selection.corpus import READERS, RawRecords, SourceSpec

log = logging.getLogger(__name__)

DEFAULT_PACKAGES = (
    "asyncio",
    "concurrent",
    "email",
    "http",
    "importlib",
    "json",
    "logging",
    "multiprocessing",
    "sqlite3",
    "unittest",
    "urllib",
    "xml",
    "xmlrpc",
    "wsgiref",
    "zoneinfo",
    "tomllib",
    "collections",
)
# Not "os": its page prints os.environ (the process environment), which is neither stable nor private.
DEFAULT_MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "tokenize",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "zipfile",
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@READERS.register("python_code")
def read_stdlib_code(spec: SourceSpec, _path: Path | None = None) -> RawRecords:
    root = stdlib_dir()
    for package in spec.options.get("packages", DEFAULT_PACKAGES):
        pkg_dir = root / package
        if not pkg_dir.is_dir():
            log.info("demo corpus: no stdlib package %s in this Python; skipped", package)
            continue
        parts = []
        for file in sorted(p for p in pkg_dir.rglob("*.py") if "test" not in p.relative_to(root).parts[1:-1]):
            rel = file.relative_to(root).as_posix()
            parts.append(f"# ---- file: {rel} ----\n{file.read_text(encoding='utf-8', errors='replace')}")
        yield "\n".join(parts), f"stdlib:{package}"


# Reprs of default values carry memory addresses ("<function f at 0x7fa4...>"), which differ per process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _render_module_doc(name: str) -> str | None:
    """pydoc's plain-text page for a module, with per-process details removed so the text is stable."""
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
            text = pydoc.render_doc(
                module, title="Python Library Documentation: %s", renderer=pydoc.plaintext
            )
        return _ADDRESS.sub(" at 0x...", text)
    except Exception as exc:  # a module missing on this platform just shrinks the demo
        log.info("demo corpus: pydoc for %s unavailable (%s); skipped", name, exc)
        return None


@READERS.register("python_docs")
def read_python_docs(spec: SourceSpec, _path: Path | None = None) -> RawRecords:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    if spec.options.get("reference_topics", True) and topics:
        yield (
            "\n\n".join(f"{key}\n{'=' * len(key)}\n{topics[key]}" for key in sorted(topics)),
            "pydoc_data.topics",
        )
    for name in spec.options.get("modules", DEFAULT_MODULES):
        text = _render_module_doc(name)
        if text:
            yield text, f"pydoc:{name}"
