"""bench/common.py: where a benchmark's table lands in bench/RESULTS.md."""

from __future__ import annotations

from bench.common import append_to_section


def test_append_to_section_places_tables(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_to_section(path, "## Data", "table 1", intro="How the data bench works.")
    assert path.read_text() == "# Benchmark results\n\n## Data\n\nHow the data bench works.\n\ntable 1\n"
    append_to_section(path, "## Serving", "table 2")
    # a later table of an earlier section goes before the next section, not at the end of the file
    append_to_section(path, "## Data", "table 3\n", intro="not repeated")
    text = path.read_text()
    assert text.count("## Data") == 1 and "not repeated" not in text
    assert text.index("table 1") < text.index("table 3") < text.index("## Serving") < text.index("table 2")
    assert text.endswith("## Serving\n\ntable 2\n")
    assert "\n\n\n" not in text
