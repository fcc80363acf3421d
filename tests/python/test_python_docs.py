"""docs/python.md's worked example: its ```python blocks, run in order in one fresh
interpreter from the root of the checkout (the installed package), so the page cannot rot."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "python.md")


def code_blocks(markdown: str) -> list:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_worked_example_runs(tmp_path):
    blocks = code_blocks(open(DOC, encoding="utf-8").read())
    assert len(blocks) >= 7  # load, routing, experts of a token, removal, steering, index, chat
    script = tmp_path / "python_md.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "steered:" in out and "KL(before || after)" in out and "experts of group 1 above 0.01" in out


def test_readme_links_the_page():
    assert "docs/python.md" in open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
