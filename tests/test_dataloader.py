"Tests of llm_playground.dataloader that are too slow or too broad for notebook 03_data: workers, multi-shard memory maps, resuming across epochs, errors, the dataset config group."
import json, pickle, time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llm_playground.config import ConfigError, compose_config, config_dir, validate_config
from llm_playground.dataloader import (DatasetConfig, NextTokenPredictionDataset, ResumableDataLoader, ResumableSampler,
                                       TokenStream, create_dataloader, dataloaders_from_config, load_tokens, num_windows)
from llm_playground.tokenizer import CharTokenizer

FIXTURE = Path(__file__).resolve().parent.parent/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


def brute_force_windows(n, L, S): return sum(1 for s in range(0, n, S) if s + L + 1 <= n)


def write_shards(folder: Path, sizes, dtype=np.uint16, start=0) -> np.ndarray:
    "Write consecutive ids into shards of `sizes` tokens; return the whole stream."
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(sum(sizes)) + start
    o = 0
    for k, n in enumerate(sizes):
        ids[o:o+n].astype(dtype).tofile(folder/f"shard_{k:03d}.bin"); o += n
    return ids


# ---------------------------------------------------------------- windows

def test_num_windows_matches_brute_force():
    for n in range(0, 120):
        for L in range(1, 20):
            for S in range(1, 25): assert num_windows(n, L, S) == brute_force_windows(n, L, S), (n, L, S)


@pytest.mark.parametrize("L,S", [(1, 1), (4, 4), (5, 3), (8, 1), (7, 11), (16, 16)])
def test_dataset_windows_over_shards_equal_concatenation(tmp_path, L, S):
    # ragged shards, one empty (skipped inside a directory), uint32 from a manifest in the parent folder
    (tmp_path/"manifest.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 100000}))
    ids = write_shards(tmp_path/"train", [13, 0, 1, 29, 7, 50], dtype=np.uint32, start=70000)   # ids above 65535
    ds = NextTokenPredictionDataset(tmp_path/"train", max_length=L, stride=S)
    assert len(ds) == brute_force_windows(len(ids), L, S) == (len(ids) - L - 1) // S + 1
    assert all(isinstance(p, np.memmap) and p.dtype == np.dtype("<u4") for p in ds.tokens.parts)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (L,)
        assert x.tolist() == ids[i*S : i*S+L].tolist() and y.tolist() == ids[i*S+1 : i*S+L+1].tolist()
    with pytest.raises(IndexError): ds[len(ds)]


def test_default_dtype_is_uint16_and_list_of_files(tmp_path):
    ids = write_shards(tmp_path/"d", [10, 10])
    files = sorted((tmp_path/"d").glob("*.bin"))
    ds = NextTokenPredictionDataset([files[1], files[0]], max_length=3, stride=1)   # a list keeps its order
    stream = np.concatenate([ids[10:], ids[:10]])
    assert ds.tokens.parts[0].dtype == np.dtype("<u2")
    assert all(ds[i][0].tolist() == stream[i:i+3].tolist() for i in range(len(ds)))


def test_text_file_and_mixed_list(tmp_path):
    tok = CharTokenizer()
    text = FIXTURE.read_text(encoding="utf-8")
    ds = NextTokenPredictionDataset(FIXTURE, tok, max_length=64, stride=32)
    assert len(ds.tokens) == len(text) and len(ds) == num_windows(len(text), 64, 32)
    assert tok.decode(ds[3][0].tolist()) == text[96:160]
    bin_ids = write_shards(tmp_path/"b", [20])
    mixed = load_tokens([FIXTURE, tmp_path/"b"/"shard_000.bin"], tok)
    assert len(mixed) == len(text) + 20 and mixed[len(text)-2:len(text)+3].tolist() == tok.encode(text[-2:]) + bin_ids[:3].tolist()


def test_memmap_is_never_loaded_whole(tmp_path):
    # a sparse 1 GiB token file: reading a window must not touch (or allocate) the rest
    f = tmp_path/"big.bin"
    with open(f, "wb") as fh: fh.truncate(2**30)
    t = time.perf_counter()
    ds = NextTokenPredictionDataset(f, max_length=1024)
    x, y = ds[len(ds) - 1]
    assert time.perf_counter() - t < 2 and len(ds) == (2**29 - 1025) // 1024 + 1 and int(x.sum()) == 0
    assert len(pickle.dumps(ds)) < 2000   # memory maps pickle by file name


def test_dataset_pickles_for_spawned_workers(tmp_path):
    ids = write_shards(tmp_path/"s", [40, 25])
    ds = NextTokenPredictionDataset(tmp_path/"s", max_length=8, stride=5)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert isinstance(ds2.tokens.parts[0], np.memmap)
    assert all(torch.equal(torch.stack(ds[i]), torch.stack(ds2[i])) for i in range(len(ds)))
    dl = create_dataloader(ds, batch_size=4, shuffle=False, num_workers=1, multiprocessing_context="spawn")
    assert torch.cat([x for x, _ in dl]).tolist() == [ids[i*5:i*5+8].tolist() for i in range(len(ds) // 4 * 4)]


# ---------------------------------------------------------------- errors

def test_errors(tmp_path):
    write_shards(tmp_path/"ok", [20])
    (tmp_path/"empty.bin").touch()
    (tmp_path/"empty.txt").touch()
    (tmp_path/"nothing").mkdir()
    (tmp_path/"notes.md").write_text("hello")
    np.arange(3, dtype=np.uint8).tofile(tmp_path/"odd.bin")
    cases = [
        (lambda: NextTokenPredictionDataset(tmp_path/"ok", max_length=20), ValueError, ["has 20 tokens", "max_length=20", "at least 21", str(tmp_path/"ok")]),
        (lambda: NextTokenPredictionDataset(tmp_path/"ok", max_length=4, stride=0), ValueError, ["stride must be a positive integer"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"ok", max_length=4, stride=-3), ValueError, ["stride", "-3"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"ok", max_length=0), ValueError, ["max_length must be a positive integer"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"missing.bin"), FileNotFoundError, ["not found", "missing.bin"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"empty.bin"), ValueError, ["empty.bin is empty"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"empty.txt", CharTokenizer()), ValueError, ["empty.txt is empty"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"nothing"), FileNotFoundError, ["No .bin or .txt"]),
        (lambda: NextTokenPredictionDataset(FIXTURE), ValueError, ["pass a tokenizer"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"notes.md"), ValueError, ["expected a .txt or .bin"]),
        (lambda: NextTokenPredictionDataset(tmp_path/"odd.bin"), ValueError, ["3 bytes", "uint16"]),
        (lambda: create_dataloader(NextTokenPredictionDataset(tmp_path/"ok", max_length=4), batch_size=8), ValueError, ["fewer than batch_size=8"]),
        (lambda: create_dataloader(NextTokenPredictionDataset(tmp_path/"ok", max_length=4), batch_size=0), ValueError, ["batch_size"]),
        (lambda: create_dataloader(NextTokenPredictionDataset(tmp_path/"ok", max_length=4), batch_size=1, seed=-1), ValueError, ["seed"]),
    ]
    for f, exc, parts in cases:
        with pytest.raises(exc) as e: f()
        for p in parts: assert p in str(e.value), (p, str(e.value))


def test_directory_of_only_empty_shards_is_too_short(tmp_path):
    (tmp_path/"d").mkdir(); (tmp_path/"d"/"a.bin").touch()
    with pytest.raises(ValueError, match="has 0 tokens"): NextTokenPredictionDataset(tmp_path/"d", max_length=4)


# ---------------------------------------------------------------- shuffling and batching

def test_seeded_shuffling():
    torch.manual_seed(0); np.random.seed(0)
    a = ResumableSampler(100, seed=7); e0, e1 = list(a), list(a)
    torch.manual_seed(1); np.random.seed(1)        # global RNG state plays no part
    b = ResumableSampler(100, seed=7)
    assert list(b) == e0 and list(b) == e1
    assert sorted(e0) == sorted(e1) == list(range(100)) and e0 != e1
    assert list(ResumableSampler(100, seed=8)) != e0
    assert list(a.order(0)) == e0 and list(a.order(1)) == e1   # the order is a function of (seed, epoch)


def test_sampler_memory_does_not_grow_with_the_number_of_windows():
    "Two billion windows (a 2B-token corpus read with stride 1): building the sampler and drawing from it holds a few chunks, not a permutation."
    import tracemalloc
    tracemalloc.start()
    s = ResumableSampler(2_000_000_000, seed=1); it = iter(s)
    first = [next(it) for _ in range(20_000)]
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert peak < 8 << 20, peak                      # a permutation would be 16 GB
    assert len(set(first)) == len(first) and max(first) > 1_000_000_000  # distinct, spread over the whole range
    s2 = ResumableSampler(2_000_000_000, seed=0); s2.load_state_dict(s.state_dict())
    assert [next(iter(s2)) for _ in range(1)] == [next(it)]   # resumes at the next index


@pytest.mark.parametrize("world,n,batch", [(2, 23, 4), (3, 40, 2), (4, 9, 1)])
def test_ranks_share_one_order(world, n, batch):
    "Each step, the ranks' batches together are the batch of one process with batch * world; nothing is read twice."
    ds = NextTokenPredictionDataset(np.arange(n + 1), max_length=1)
    one = [sorted(x[:, 0].tolist()) for x, _ in create_dataloader(ds, batch_size=batch * world, seed=4)]
    ranks = [[x[:, 0].tolist() for x, _ in create_dataloader(ds, batch_size=batch, seed=4, rank=r, world_size=world)] for r in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(one)   # every rank the same number of steps
    assert [sorted(sum(step, [])) for step in zip(*ranks)] == one


@pytest.mark.parametrize("drop_last,expected", [(True, [4, 4]), (False, [4, 4, 2])])
def test_batch_sizes_and_drop_last(drop_last, expected):
    ds = NextTokenPredictionDataset(np.arange(31), max_length=3)   # (31-4)//3+1 = 10 windows
    assert len(ds) == 10
    dl = create_dataloader(ds, batch_size=4, drop_last=drop_last, seed=3)
    sizes = [len(x) for x, _ in dl]
    assert sizes == expected and len(dl) == len(expected)
    starts = [int(v) for x, _ in create_dataloader(ds, batch_size=4, shuffle=False, drop_last=False) for v in x[:, 0]]
    assert starts == [3*i for i in range(10)]


def run_epochs(dl, n_epochs, stop_after=None, use_set_epoch=True):
    "Batches (first input token of each row) of a trainer-like loop; stop after `stop_after` batches and return the state."
    out = []
    if stop_after == 0: return out, dl.state_dict()
    first = dl.state_dict()["epoch"]
    for epoch in range(first, n_epochs):
        if use_set_epoch: dl.set_epoch(epoch)
        for x, _ in dl:
            out.append(x[:, 0].tolist())
            if stop_after is not None and len(out) == stop_after: return out, dl.state_dict()
    return out, dl.state_dict()


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("use_set_epoch", [True, False])
def test_resume_at_every_batch_equals_uninterrupted(drop_last, use_set_epoch):
    ds = NextTokenPredictionDataset(np.arange(2 * 23 + 1), max_length=2)   # 23 windows: batches of 4 leave 3 over
    mk = lambda: create_dataloader(ds, batch_size=4, drop_last=drop_last, seed=11)
    full, _ = run_epochs(mk(), 3, use_set_epoch=use_set_epoch)
    assert len(full) == 3 * (5 if drop_last else 6)
    for cut in range(len(full) + 1):
        head, state = run_epochs(mk(), 3, stop_after=cut, use_set_epoch=use_set_epoch)
        dl = mk(); dl.load_state_dict(pickle.loads(pickle.dumps(state)))   # as if through a checkpoint
        tail, _ = run_epochs(dl, 3, use_set_epoch=use_set_epoch)
        assert head + tail == full, f"cut after {cut} batches, state {state}"


def test_sampler_state_alone_resumes_exactly():
    full = ResumableSampler(10, seed=5); seq = [i for _ in range(3) for i in full]
    for cut in range(len(seq) + 1):
        s = ResumableSampler(10, seed=5); got, it = [], iter(s)
        while len(got) < cut:
            try: got.append(next(it))
            except StopIteration: it = iter(s)
        s2 = ResumableSampler(10, seed=0); s2.load_state_dict(s.state_dict())
        while len(got) < len(seq): got.extend(s2)
        assert got == seq, cut


def test_resume_with_two_workers():
    ds = NextTokenPredictionDataset(np.arange(3 * 40 + 1), max_length=3)   # 40 windows, 10 batches of 4 per epoch
    mk = lambda workers: create_dataloader(ds, batch_size=4, seed=2, num_workers=workers)
    full, _ = run_epochs(mk(0), 2)
    dl = mk(2)
    assert run_epochs(dl, 2)[0] == full                       # workers change nothing
    for cut in (3, 10, 13):                                   # mid-epoch, at the epoch boundary, in the next epoch
        dl = mk(2)
        head, state = run_epochs(dl, 2, stop_after=cut)
        assert (state["epoch"], state["samples_yielded"]) == {3: (0, 12), 10: (0, 40), 13: (1, 12)}[cut]
        if cut == 3: assert dl.sampler.state_dict()["samples_yielded"] > 12   # the sampler ran ahead (prefetching)...
        dl2 = mk(2); dl2.load_state_dict(state)               # ...but the loader's state is what was delivered
        assert head + run_epochs(dl2, 2)[0] == full, cut
        assert head + run_epochs(dl, 2)[0] == full, cut       # the interrupted loader itself continues exactly too


def test_one_batch_does_not_move():
    ds = NextTokenPredictionDataset(np.arange(50), max_length=4)
    dl = create_dataloader(ds, batch_size=3, seed=1)
    first = dl.one_batch()
    assert dl.state_dict()["samples_yielded"] == 0 and torch.equal(next(iter(dl))[0], first[0])


def test_load_state_checks_dataset_size():
    dl = create_dataloader(NextTokenPredictionDataset(np.arange(50), max_length=4), batch_size=2)
    with pytest.raises(ValueError, match="dataset of 99 samples"):
        dl.load_state_dict({"epoch": 0, "seed": 0, "samples_yielded": 0, "num_samples": 99})
    with pytest.raises(ValueError, match="outside"):
        dl.load_state_dict({"epoch": 0, "seed": 0, "samples_yielded": 13})


def test_pin_memory_follows_cuda():
    ds = NextTokenPredictionDataset(np.arange(50), max_length=4)
    dl = create_dataloader(ds, batch_size=2)
    assert dl.pin_memory == torch.cuda.is_available()
    if torch.cuda.is_available(): assert next(iter(dl))[0].is_pinned()


# ---------------------------------------------------------------- config

def processed_dir(root: Path) -> Path:
    (root/"manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    write_shards(root/"train", [300, 0, 211])
    write_shards(root/"validation", [70])
    return root


def test_default_config_validates_and_composes():
    assert OmegaConf.to_container(OmegaConf.load(config_dir()/"dataset"/"default.yaml")) == {}   # a comment: the schema holds the defaults
    assert OmegaConf.to_container(compose_config("pretrain").dataset) == OmegaConf.to_container(OmegaConf.structured(DatasetConfig))
    cfg = validate_config(OmegaConf.load(config_dir()/"dataset"/"default.yaml"), DatasetConfig, where="dataset")
    assert cfg.train.endswith("data/processed/train") and Path(cfg.train).is_absolute()
    assert (cfg.max_length, cfg.stride, cfg.shuffle, cfg.drop_last, cfg.pin_memory) == (256, None, True, True, None)
    assert set(cfg.keys()) == {f for f in DatasetConfig.__dataclass_fields__}
    full = compose_config("pretrain", ["dataset=default", "dataset.batch_size=3"])   # the group is found in the package
    assert validate_config(full.dataset, DatasetConfig).batch_size == 3


def test_dataloaders_from_config(tmp_path):
    root = processed_dir(tmp_path)
    cfg = OmegaConf.load(config_dir()/"dataset"/"default.yaml")
    cfg.train, cfg.validation = str(root/"train"), str(root/"validation")
    cfg.max_length, cfg.stride, cfg.batch_size, cfg.num_workers = 16, 8, 4, 0
    train, valid = dataloaders_from_config(cfg)
    assert isinstance(train, ResumableDataLoader) and len(train.dataset) == num_windows(511, 16, 8)
    assert len(valid.dataset) == num_windows(70, 16, 16) and not valid.sampler.shuffle and not valid.drop_last
    assert train.sampler.shuffle and train.drop_last and train.sampler.seed == 0
    _, none = dataloaders_from_config({**OmegaConf.to_container(cfg), "validation": None})
    assert none is None
    with pytest.raises(ConfigError, match="Did you mean: stride"):
        dataloaders_from_config({**OmegaConf.to_container(cfg), "strid": 3})
    with pytest.raises(ConfigError, match="dataset.batch_size"):
        dataloaders_from_config({**OmegaConf.to_container(cfg), "batch_size": "many"})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataloaders_from_config({**OmegaConf.to_container(cfg), "validation": str(tmp_path/"nowhere")})
