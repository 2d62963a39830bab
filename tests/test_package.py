"""The installed package: a non-editable install ships its configs and works from any directory."""
import json, os, subprocess, sys, zipfile
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(TOP)],
                   check=True, cwd=out)
    (whl,) = out.glob("llm_playground-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    "The wheel installed (non-editable) into its own folder, to be put first on PYTHONPATH."
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    return target


def run_installed(code, site, cwd, **env):
    e = {k: v for k, v in os.environ.items() if k != "LLM_PLAYGROUND_ROOT"}
    e.update(PYTHONPATH=str(site), **env)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_wheel_ships_yaml_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm_playground/configs/__init__.py" in names
    src = TOP/"llm_playground"/"configs"
    yamls = sorted(p.relative_to(TOP).as_posix() for p in src.rglob("*.yaml"))
    assert "llm_playground/configs/preprocess.yaml" in yamls and "llm_playground/configs/tokenizer/gpt2.yaml" in yamls
    missing = [y for y in yamls if y not in names]
    assert not missing, f"YAML configs left out of the wheel: {missing}"
    assert "llm_playground/data/tinyshakespeare.txt" in names   # the packaged corpus


PROBE = """
import json, llm_playground
from llm_playground.config import compose_config, project_root
from hydra.utils import instantiate
cfg = compose_config("preprocess", ["tokenizer=char"])
tok = instantiate(compose_config("preprocess").tokenizer)
print(json.dumps(dict(file=llm_playground.__file__, root=str(project_root()), input_dir=cfg.input_dir,
                      out_dir=cfg.out_dir, char_vocab=instantiate(cfg.tokenizer).vocab_size, ids=tok.encode("Hello world"))))
"""


def test_installed_package_composes_configs_from_any_directory(installed, tmp_path):
    work = tmp_path/"my_project"; work.mkdir()
    got = run_installed(PROBE, installed, cwd=work)
    assert Path(got["file"]).is_relative_to(installed), "the test must exercise the installed copy, not the clone"
    assert got["root"] == str(work.resolve())  # outside a clone, the root is the current directory
    assert got["input_dir"] == str(work.resolve()/"data"/"raw")
    assert got["out_dir"] == str(work.resolve()/"data"/"processed")
    assert got["ids"] == [15496, 995]
    assert got["char_vocab"] == 101


def test_root_env_var_overrides(installed, tmp_path):
    other = tmp_path/"elsewhere"; other.mkdir()
    got = run_installed(PROBE, installed, cwd=tmp_path, LLM_PLAYGROUND_ROOT=str(other))
    assert got["input_dir"] == str(other.resolve()/"data"/"raw")


def test_inside_a_clone_the_root_is_the_clone(installed):
    got = run_installed(PROBE, installed, cwd=TOP/"nbs")
    assert got["root"] == str(TOP)


def test_python_m_cli_runs_every_console_script():
    "`python -m llm_playground.cli <cmd>` dispatches to the same entry points as the installed `lp_<cmd>` scripts."
    from configparser import ConfigParser
    from llm_playground.cli import _COMMANDS
    cfg = ConfigParser(); cfg.read(Path(__file__).resolve().parents[1]/"settings.ini")
    scripts = dict(l.strip().split("=", 1) for l in cfg["DEFAULT"]["console_scripts"].splitlines() if l.strip())
    assert {f"lp_{k}": v for k, v in _COMMANDS.items()} == scripts
