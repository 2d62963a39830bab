#!/usr/bin/env python
"""README.md from nbs/index.ipynb, without Quarto (nbdev_readme needs it).

    python .ci/readme.py            # write README.md
    python .ci/readme.py --check    # exit 1 if README.md is stale
    python .ci/readme.py --command test|main   # print the README's shell command for that job

Markdown cells are copied; code cells (minus `#|` directives) become ```python blocks followed by their text outputs;
cells flagged `#| hide` are left out, as nbdev does.
"""
import json, re, sys
from pathlib import Path

top = Path(__file__).resolve().parent.parent
NB, README = top/"nbs"/"index.ipynb", top/"README.md"

def _src(cell): return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]

def render() -> str:
    nb = json.loads(NB.read_text(encoding="utf-8"))
    parts = []
    for c in nb["cells"]:
        src = _src(c)
        if c["cell_type"] == "markdown":
            parts.append(src.strip())
            continue
        if c["cell_type"] != "code" or re.search(r"^#\|\s*hide\s*$", src, re.M): continue
        code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
        if code: parts.append(f"```python\n{code}\n```")
        for o in c.get("outputs", []):
            txt = o.get("text") or o.get("data", {}).get("text/plain")
            if txt: parts.append("    " + "".join(txt).rstrip().replace("\n", "\n    "))
    return "\n\n".join(parts) + "\n"

def command(job: str) -> str:
    "The first ```sh block after the paragraph naming `job` ('main job' or 'tests')."
    text = README.read_text(encoding="utf-8")
    key = {"main": "run the main job", "test": "run the tests"}[job]
    after = text[text.index(key):]
    return re.search(r"```sh\n(.+?)\n```", after, re.S).group(1).strip()

if __name__ == "__main__":
    if "--command" in sys.argv: print(command(sys.argv[sys.argv.index("--command") + 1])); sys.exit(0)
    new = render()
    if "--check" in sys.argv:
        if README.read_text(encoding="utf-8") != new:
            print("README.md is stale: run `python .ci/readme.py` and commit it."); sys.exit(1)
        print("README.md is up to date."); sys.exit(0)
    README.write_text(new, encoding="utf-8")
    print(f"wrote {README}")
