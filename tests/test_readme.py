"""The README's Python snippets run as written, each in a fresh interpreter (imports included), and print what the
README shows below them."""
import ast, json, os, re, subprocess, sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1]/"README.md"
TEXT = Path(__file__).resolve().parents[1]/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


def snippets() -> list[tuple[str, str | None]]:
    "Each ```python block of the README, with the indented output block right after it (None if there is none)."
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```python\n(.*?)\n```\n(\n((?:    [^\n]*\n?)+))?", text, re.S):
        shown = m.group(3)
        out.append((m.group(1), "\n".join(l[4:] for l in shown.rstrip("\n").split("\n")) if shown else None))
    return out


# runs a snippet as a notebook cell would: statements, then the value of a final expression printed with repr
DRIVER = """
import ast, sys
src = sys.stdin.read(); tree = ast.parse(src); ns = {}
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
exec(compile(tree, "<readme>", "exec"), ns)
if last is not None:
    v = eval(compile(ast.Expression(last.value), "<readme>", "eval"), ns)
    if v is not None: print(repr(v))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project root holding one tiny trained run under models/ (what `load_model(\"latest\")` finds)."
    from llm_playground.cli import pretrain
    from llm_playground.config import compose_config
    root = tmp_path_factory.mktemp("readme")
    o = ["experiment=smoke", f"dataset.train={TEXT}", f"trainer.output_dir={root/'models'}", "trainer.max_steps=2",
         "trainer.save_steps=0", "trainer.device=cpu", "trainer.sampling.prompts=[]", "trainer.plot=false"]
    pretrain(compose_config("pretrain", o), o)
    return root


def test_readme_has_snippets():
    assert len(snippets()) >= 2


@pytest.mark.parametrize("i", range(len(snippets())))
def test_readme_snippet_runs_as_written(project, i):
    code, shown = snippets()[i]
    r = subprocess.run([sys.executable, "-c", DRIVER], input=code, capture_output=True, text=True, cwd=project, timeout=120,
                       env=dict(os.environ, LLM_PLAYGROUND_ROOT=str(project), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"README snippet {i} failed:\n{code}\n{r.stderr}"
    if shown is not None: assert r.stdout.strip() == shown.strip()
    else: assert r.stdout.strip() or "print(" not in code   # a snippet that prints, prints something
