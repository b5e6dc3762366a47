"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # The example of the "Use the library" section (other sections show code for machines we lack, e.g. Slurm).
    section = text.split("## Use the library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md's 'Use the library' section has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README's example
    out = capsys.readouterr().out
    assert "spearman" in out and "drift of the control run" in out
    assert len(namespace["predicted"]) == 149
