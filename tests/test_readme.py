"""Every ```python block of the README runs, in order, in one namespace (as a reader would paste them)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(_python_blocks(README.read_text(encoding="utf-8"))) >= 3


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(_python_blocks(README.read_text(encoding="utf-8"))):
        code = compile(block, f"README.md python block {index}", "exec")
        exec(code, namespace)  # noqa: S102 - the README's examples are the test subject
