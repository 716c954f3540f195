"""The demo corpus, built at run time from text every Python installation ships (never committed).

- `python_code`: each standard-library package's source files concatenated in path order, one document
  per package (the shape of repository-concatenated code corpora).
- `python_docs`: long English documentation: the language-reference topics of `pydoc_data` as one
  document, plus the plain-text `pydoc` rendering of a fixed list of modules, one document each.

The text depends on the Python version, which the prepare stage puts in its fingerprint.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import sysconfig
from pathlib import Path

from common.corpus import READERS, RawRecords, SourceSpec

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


# pydoc's DATA sections print live module state (loggers, registries, default-value reprs with memory
# addresses), so a page rendered inside a pipeline depends on what that process imported and configured
# first. Pages are therefore rendered in a clean child interpreter: no site-packages (-S), a fixed hash
# seed, a minimal environment, started from "/" so no project file can shadow a stdlib module.
_RENDER_SCRIPT = r"""
import io, json, pydoc, re, sys, warnings, importlib
from contextlib import redirect_stderr, redirect_stdout
address = re.compile(r" at 0x[0-9a-fA-F]+")
pages = {}
for name in sys.argv[1:]:
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
            text = pydoc.render_doc(module, title="Python Library Documentation: %s", renderer=pydoc.plaintext)
        pages[name] = address.sub(" at 0x...", text)
    except ImportError:  # not built on this platform: the demo is just smaller
        pages[name] = None
sys.stdout.write(json.dumps(pages))
"""


def render_module_docs(names: list[str]) -> dict[str, str | None]:
    """Plain-text pydoc pages of stdlib modules (None where a module is unavailable), process-independent."""
    env = {"PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _RENDER_SCRIPT, *names],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd="/",
        timeout=600,
    )
    if proc.returncode:
        raise RuntimeError(f"rendering the demo documentation failed: {proc.stderr[-1000:]}")
    pages = json.loads(proc.stdout)
    for name, text in pages.items():
        if text is None:
            log.info("demo corpus: pydoc for %s unavailable on this Python; skipped", name)
    return pages


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
    names = list(spec.options.get("modules", DEFAULT_MODULES))
    pages = render_module_docs(names)
    for name in names:
        if pages.get(name):
            yield pages[name], f"pydoc:{name}"
