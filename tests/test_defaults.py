"""One source for every default: the packaged configs add nothing to the schemas, and Python trains like the command line."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm_playground.config import SCHEMAS, compose_config, config_schema

TOP = Path(__file__).resolve().parent.parent
FIXTURE = TOP/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


def plain(cfg): return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_composed_defaults_are_the_schema(name):
    "Each primary config composed with no overrides is exactly its schema's defaults."
    assert plain(compose_config(name)) == plain(OmegaConf.structured(config_schema(name)))


def test_default_group_files_add_nothing():
    "The default file of each group holds comments only; the values are the schema's."
    from llm_playground.config import config_dir
    for f in ["preprocessing/default.yaml", "dataset/default.yaml", "optimiser/adamw.yaml", "trainer/default.yaml",
              "trainer/sampling/default.yaml", "corpus/python_docs.yaml", "model/gpt2_124m.yaml"]:
        values = {k: v for k, v in (OmegaConf.load(config_dir()/f) or {}).items() if k != "defaults"}  # (a defaults list names a base)
        assert values == {}, f"{f} restates defaults: {values}"


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A project root holding the default corpus location, tokenized with the defaults (GPT-2), as lp_preprocess would."
    from llm_playground.preprocess import preprocess
    raw = tmp_path/"data"/"raw"; raw.mkdir(parents=True)
    text = FIXTURE.read_text(encoding="utf-8")
    for i in range(4): (raw/f"part_{i}.txt").write_text((text + "\n\n") * 3, encoding="utf-8")
    preprocess(raw, tmp_path/"data"/"processed", verbose=False, progress=False)
    monkeypatch.setenv("LLM_PLAYGROUND_ROOT", str(tmp_path))
    return tmp_path


def test_python_trainer_uses_the_cli_settings(project):
    "`Trainer(model, train_dl)` with no configs and `lp_pretrain` with no overrides: same settings, same callbacks, same schedule."
    from llm_playground.cli import prepare_run
    from llm_playground.dataloader import dataloaders_from_config
    from llm_playground.tokenizer import GPT2Tokenizer
    from llm_playground.trainer import Trainer
    from llm_playground.transformer import Transformer
    cli = prepare_run(compose_config("pretrain"))  # exactly what `lp_pretrain` with no arguments builds (before training)
    assert cli.run_dir.parent.parent == project/"models"
    from llm_playground.cli import PretrainConfig
    d = OmegaConf.structured(PretrainConfig)
    train_dl, valid_dl = dataloaders_from_config(d.dataset, GPT2Tokenizer())
    py = Trainer(Transformer(d.model), train_dl, valid_dl, tokenizer=GPT2Tokenizer())
    assert plain(py.cfg) == plain(cli.cfg) and plain(py.opt_cfg) == plain(cli.opt_cfg)
    assert (py.total_steps, py.precision, py.accum) == (cli.total_steps, cli.precision, cli.accum)
    assert [type(c).__name__ for c in py.cbs] == [type(c).__name__ for c in cli.cbs]
    assert [g["lr"] for g in py.opt.param_groups] == [g["lr"] for g in cli.opt.param_groups]
    assert [py.sched.lr_lambdas[0](s) for s in range(py.total_steps)] == [cli.sched.lr_lambdas[0](s) for s in range(cli.total_steps)]
    assert py.model.cfg == cli.model.cfg


def test_compose_after_a_notebook_redefined_model_config():
    """nbdev_test reuses worker processes: after 05_model (which defines and stores its own ModelConfig) ran in one, composing
    pretrain there must still work (it failed with 'ModelConfig is not a subclass of ModelConfig')."""
    import dataclasses, subprocess, sys
    code = ("import dataclasses\nfrom hydra.core.config_store import ConfigStore\nimport llm_playground.transformer as T\n"
            "Fake = dataclasses.make_dataclass('ModelConfig', [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(T.ModelConfig)])\n"
            "ConfigStore.instance().store(group='model', name='model_schema', node=Fake)\n"
            "from llm_playground.config import compose_config\nprint(compose_config('pretrain', ['trainer.num_epochs=5']).trainer.num_epochs)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr
