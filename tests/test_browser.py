"""The playground in a real browser: JupyterLab on a free local port, headless Chromium driven by selenium, offline.

Opens a small notebook that uses `llm_playground.playground`, runs it, checks that the next-token explorer renders
(chart, sliders, coloured tokens), that moving the temperature slider redraws the chart and that the greedy button
adds a token; then that the training monitor redraws while a fit runs in the background and that its stop button
stops it, in a real kernel. Saves two screenshots under pytest's tmp dir and prints their paths. Skips, saying why,
without a browser.
Install: `apt-get install -y chromium chromium-driver` (Debian) and `pip install jupyterlab selenium` (the dev extra)."""
import importlib.util, json, os, shutil, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _why_not() -> str | None:
    "Why this machine cannot run the test, or None."
    if CHROMIUM is None: return "no chromium on PATH (Debian: apt-get install -y chromium chromium-driver)"
    if CHROMEDRIVER is None: return "no chromedriver on PATH (Debian: apt-get install -y chromium-driver)"
    for mod in ("selenium", "jupyterlab", "ipykernel"):
        if importlib.util.find_spec(mod) is None: return f"{mod} is not installed (pip install -e '.[dev]' installs it)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))

CELL = """\
import torch
from llm_playground.playground import explore
from llm_playground.tokenizer import CharTokenizer
from llm_playground.transformer import Transformer
torch.manual_seed(0)
tok = CharTokenizer()   # printable ASCII
model = Transformer(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_layers=2, n_heads=2, init_std=0.3)
explore(model, tok, prompt="It is a truth", n=8)"""

MONITOR = """\
from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
from llm_playground.playground import TrainingMonitor
from llm_playground.trainer import Trainer
data = torch.tensor(tok.encode("It is a truth universally acknowledged. " * 20))
dl = create_dataloader(NextTokenPredictionDataset(data, max_length=16, stride=4), batch_size=8, seed=0, pin_memory=False)
trainer = Trainer(model, dl, tokenizer=tok, opt_cfg=dict(lr=3e-3, warmup_steps=1), cfg=dict(max_steps=100_000, log_steps=1, device="cpu", precision="fp32", progress=False,
                  plot=False, sampling=dict(prompts=["It is"], every_epoch=False, show=False, max_new_tokens=10)))
monitor = TrainingMonitor(min_interval=0.2, sample_steps=20)
monitor.fit(trainer)
monitor.widget"""


def _notebook(path: Path):
    nb = dict(nbformat=4, nbformat_minor=5, cells=[dict(cell_type="code", id=i, metadata={}, outputs=[], execution_count=None, source=src)
                                                   for i, src in (("explorer", CELL), ("monitor", MONITOR))],
              metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    path.write_text(json.dumps(nb), encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait(what: str, f, timeout: float = 30, every: float = 0.1):
    "Poll `f()` until it returns something truthy; fail saying what did not happen."
    end = time.time() + timeout
    while time.time() < end:
        try:
            if r := f(): return r
        except Exception: pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a free port, serving tmp_path/nbs, with its own settings (no news toast); stopped after."
    nbs, home = tmp_path/"nbs", tmp_path/"jupyter"; nbs.mkdir(); home.mkdir()
    settings = home/"lab-settings"/"@jupyterlab"/"apputils-extension"; settings.mkdir(parents=True)
    (settings/"notification.jupyterlab-settings").write_text(json.dumps(dict(fetchNews="false", checkForUpdates=False)))
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(home/"config"), "JUPYTER_RUNTIME_DIR": str(home/"runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home/"lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home/"workspaces"),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path/"jupyter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
                             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nbs}",
                             "--allow-root"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None: raise AssertionError(f"jupyter lab exited: {(tmp_path/'jupyter.log').read_text()[-2000:]}")
            return urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).status == 200
        _wait("jupyter lab to answer", lambda: up(), timeout=60, every=0.25)
        yield dict(url=url, token=token, nbs=nbs, log=tmp_path/"jupyter.log")
    finally:
        proc.send_signal(signal.SIGTERM)          # the server shuts its kernels down, then exits
        try: proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100", "--disable-gpu"): opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)   # the system's driver: selenium-manager never downloads one
    try: yield d
    finally: d.quit()


def test_explorer_in_jupyterlab(lab, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    t0 = time.time()
    _notebook(lab["nbs"]/"play.ipynb")
    d = browser
    d.get(f"{lab['url']}/lab/tree/play.ipynb?token={lab['token']}")
    css = lambda sel: d.find_elements(By.CSS_SELECTOR, sel)
    _wait("the notebook to open", lambda: css(".jp-Notebook .jp-Cell .jp-InputArea-editor"), timeout=60)
    def kernel_idle():
        for b in css(".jp-Dialog .jp-mod-accept"): b.click()   # a "Select Kernel" dialog would intercept every click
        ks = json.load(urllib.request.urlopen(f"{lab['url']}/api/kernels?token={lab['token']}", timeout=2))
        return ks and ks[0]["execution_state"] == "idle" and "Idle" in css(".jp-StatusBar-Widget, #jp-main-statusbar")[0].text
    _wait("the kernel to start", kernel_idle, timeout=60, every=0.25)
    editor = _wait("the cell's editor", lambda: [e for e in css(".jp-Notebook .jp-Cell .jp-InputArea-editor") if e.is_displayed()], timeout=30)[0]
    editor.click()
    d.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)

    chart = _wait("the explorer's chart", lambda: [i for i in css(".jp-OutputArea img.widget-image") if i.get_attribute("src")], timeout=90)[0]
    src = chart.get_attribute("src")
    sliders = {s.find_element(By.CSS_SELECTOR, ".widget-label").text: s for s in css(".jp-OutputArea .widget-slider")}
    assert {"temperature", "top-k (0: off)", "top-p (1: off)", "repetition penalty"} <= set(sliders), sliders.keys()
    n_tokens = len(css(".jp-OutputArea .lp-tok"))
    assert n_tokens == len("It is a truth"), n_tokens                      # one coloured box per character token

    readout = sliders["temperature"].find_element(By.CSS_SELECTOR, ".widget-readout")
    assert readout.text == "1.00"
    readout.click(); readout.send_keys(Keys.CONTROL, "a"); readout.send_keys("1.90", Keys.ENTER)
    _wait("the chart to follow the temperature slider", lambda: chart.get_attribute("src") != src, timeout=30)
    assert readout.text == "1.90"

    greedy = next(b for b in css(".jp-OutputArea button") if b.text.strip() == "greedy")
    greedy.click()
    _wait("the greedy button to add a token", lambda: len(css(".jp-OutputArea .lp-tok")) == n_tokens + 1, timeout=30)

    shots = [tmp_path/"playground_explorer.png", tmp_path/"playground_monitor.png"]
    d.save_screenshot(str(shots[0]))

    # the training monitor: it redraws while the fit runs in a thread, and its stop button is heard by the busy kernel
    editors = [e for e in css(".jp-Notebook .jp-Cell .jp-InputArea-editor") if e.is_displayed()]
    editors[1].click(); d.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
    out = lambda: css(".jp-Notebook .jp-Cell")[1].find_element(By.CSS_SELECTOR, ".jp-OutputArea")
    plot = _wait("the monitor's plot", lambda: [i for i in out().find_elements(By.CSS_SELECTOR, "img.widget-image") if i.get_attribute("src")], timeout=60)[0]
    first = plot.get_attribute("src")
    _wait("the monitor to redraw during training", lambda: plot.get_attribute("src") != first, timeout=30)
    _wait("samples", lambda: "samples at step" in out().text, timeout=30)
    stop = next(b for b in out().find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "stop")
    stop.click()
    _wait("the stop button to stop training", lambda: "stopped at step" in out().text, timeout=30)

    d.save_screenshot(str(shots[1]))
    assert all(s.stat().st_size > 10_000 for s in shots)
    with capsys.disabled(): print(f"\n[test_browser] screenshots: {shots[0]}, {shots[1]} ({time.time() - t0:.1f} s in the browser)")
