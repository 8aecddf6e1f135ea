"""Every whole training template in the README (a fenced YAML block with `kind:
TrainingTemplate`, top level or indented in a list item) is a valid template as written: the
front door's examples are what users copy first."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from arf_training.cli import main as arf_main

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^( *)```yaml\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def readme_templates() -> list[str]:
    blocks = [textwrap.dedent(m.group(2)) for m in FENCE.finditer(README.read_text())]
    return [b for b in blocks if "kind: TrainingTemplate" in b]


def test_the_readme_has_its_templates() -> None:
    assert len(readme_templates()) >= 3


@pytest.mark.parametrize("text", readme_templates(),
                         ids=lambda t: re.search(r"name: (\w+)", t).group(1))
def test_a_readme_template_lints(text: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "template.yaml"
    path.write_text(text)
    assert arf_main(["templates", "lint", "--hub", str(tmp_path / "no-hub"), str(path)]) == 0, \
        capsys.readouterr().out
