"""What every benchmark here shares: writing its table into its section of bench/RESULTS.md, and a SIGINT
that stops a run early without losing what it measured."""

from __future__ import annotations

import signal
from pathlib import Path


def append_to_section(path: Path, heading: str, text: str, intro: str = "") -> None:
    """Put `text` at the end of the `heading` section ("## Name") of the markdown file at `path`, before the next
    "## " section; the section (with `intro` under its heading) and the file are made when missing."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if f"\n{heading}\n" not in doc:
        doc = doc.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.strip()}\n" if intro.strip() else "")
    start = doc.index(f"\n{heading}\n") + len(heading) + 2
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt < 0 else nxt + 1
    rest = "\n" + doc[end:] if end < len(doc) else ""
    path.write_text(doc[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + rest)


def interrupt_once() -> None:
    """The first SIGINT (e.g. from `timeout -s INT`) raises KeyboardInterrupt; later ones are ignored, so
    the partial results are still cleaned up after and written."""
    seen = []

    def handler(signum, frame):
        if not seen:
            seen.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
