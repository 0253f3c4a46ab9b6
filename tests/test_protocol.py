"""The online protocol: references, shared pretrained nets and streams, k = n."""

import json

import pytest

from sparse_rtrl.experiments import config as cfg
from sparse_rtrl.experiments import stats
from sparse_rtrl.experiments.protocol import LOG_LINE, derive_seeds, run_online
from sparse_rtrl.experiments.runner import Diverged, run_one


def tiny(estimator="frozen", options=None, **sections):
    config = {
        "task": {"name": "delayed_recall"},
        "cell": {"hidden_size": 8},
        "estimator": {"name": estimator, "options": options or {}},
        "pretrain": {"steps": 20, "batch": 4, "seq_len": 16},
        "run": {
            "adapt_steps": 80,
            "pre_shift_steps": 10,
            "log_every": 40,
            "dtype": "float64",
        },
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return cfg.resolve(config)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "runs").mkdir()
    return root


def run(config, seed, cache, name):
    folder = cache / "runs" / name
    folder.mkdir(exist_ok=True)
    return run_online(config, seed, folder)


def test_zero_learning_rate_reproduces_the_frozen_loss_bitwise(cache):
    frozen = run(tiny(), 0, cache, "frozen")
    for est, opts in (("rtrl", {}), ("sparse_rtrl", {"num_paths": 2})):
        for opt in ("adam", "sgd"):
            config = tiny(est, opts, optimizer={"name": opt, "lr": 0.0})
            got = run(config, 0, cache, f"{est}-{opt}-lr0")
            assert got["loss_final"] == frozen["loss_final"]
            assert got["loss_all"] == frozen["loss_all"]


def test_every_method_of_a_seed_shares_the_pretrained_net_and_the_stream(cache):
    methods = [
        ("frozen", {}),
        ("rtrl", {}),
        ("sparse_rtrl", {"num_paths": 1}),
        ("sparse_rtrl", {"num_paths": 3, "selection": "topk"}),
    ]
    from sparse_rtrl.estimators import ESTIMATORS

    methods += [(name, {}) for name in ("snap", "uoro") if name in ESTIMATORS]
    hashes = {
        (s["pretrained_hash"], s["stream_hash"])
        for s in (
            run(tiny(n, o), 1, cache, f"h-{n}-{i}") for i, (n, o) in enumerate(methods)
        )
    }
    assert len(hashes) == 1
    other = run(tiny(), 2, cache, "h-seed2")
    ((weights, stream),) = hashes
    assert other["pretrained_hash"] != weights and other["stream_hash"] != stream


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_k_equal_n_through_the_sparse_code_recovers_exactly(cache, dtype):
    # In float32 too: with every path kept the sparse update multiplies by J_t
    # itself, so no rounding difference exists for 150 Adam steps to amplify.
    size = {"cell": {"hidden_size": 16}, "run": {"adapt_steps": 150, "dtype": dtype}}
    frozen = run(tiny(**size), 3, cache, f"kn-frozen-{dtype}")
    full = run(tiny("rtrl", {}, **size), 3, cache, f"kn-full-{dtype}")
    sparse = run(
        tiny("sparse_rtrl", {"num_paths": "all"}, **size),
        3,
        cache,
        f"kn-sparse-{dtype}",
    )
    assert stats.gap(frozen["loss_final"], full["loss_final"]) > 0.05
    value = stats.recovery(
        frozen["loss_final"], sparse["loss_final"], full["loss_final"]
    )
    assert value == pytest.approx(1.0, abs=1e-9)
    assert full["loss_final"] < frozen["loss_final"]


def test_a_blow_up_raises_diverged_with_the_step(cache):
    config = tiny("rtrl", {}, optimizer={"name": "sgd", "lr": 1e6})
    with pytest.raises(Diverged, match=r"step \d+: the (loss|hidden state)"):
        run(config, 0, cache, "blowup")


def test_run_one_dispatches_and_writes_metrics(cache):
    folder = cache / "runs" / "dispatch"
    folder.mkdir()
    summary = run_one(tiny(), 0, folder)
    assert {"loss_all", "loss_final", "diverged"} <= set(summary)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [40, 80]
    line = LOG_LINE.format(label="frozen s0", step=40, total=90, loss=0.5, ms=1.0)
    assert line == "frozen s0 step      40/90 loss 5.0000e-01 ms/step    1.00"
    with pytest.raises(ValueError, match="online"):
        run_one({"kind": "nope"}, 0, folder)


def test_seeds_are_spawned_and_distinct():
    seeds = derive_seeds(5)
    assert len(set(seeds.values())) == 4 and seeds == derive_seeds(5)
    assert derive_seeds(6) != seeds


def test_overrides_are_type_checked_and_unknown_keys_listed():
    base = tiny()
    assert (
        cfg.apply_overrides(base, ["cell.hidden_size=16"])["cell"]["hidden_size"] == 16
    )
    assert cfg.apply_overrides(base, ["optimizer.lr=1"])["optimizer"]["lr"] == 1.0
    with pytest.raises(TypeError, match="cell.hidden_size` expects int"):
        cfg.apply_overrides(base, ["cell.hidden_size=1.5"])
    with pytest.raises(ValueError, match="valid keys of `cell`: alpha, hidden_size"):
        cfg.apply_overrides(base, ["cell.size=3"])
    with pytest.raises(ValueError, match="valid options"):
        cfg.apply_overrides(
            base, ["estimator.name=rtrl", "estimator.options.num_paths=3"]
        )
    assert cfg.resolve(base) == base


def test_learning_rate_choice_takes_the_best_worst_size(monkeypatch):
    """choose_learning_rates: per pair, the rate whose largest loss over the
    sizes is smallest (not the best at one size)."""
    from sparse_rtrl.experiments import protocol

    losses = {  # (lr, n) -> loss: 1e-2 is best at n=32 but blows up at n=256
        (1e-3, 32): 0.9,
        (1e-3, 256): 0.8,
        (3e-3, 32): 0.7,
        (3e-3, 256): 1.3,
        (1e-2, 32): 0.6,
        (1e-2, 256): float("inf"),
    }
    monkeypatch.setitem(protocol.LR_GRIDS, "adam", (1e-3, 3e-3, 1e-2))
    monkeypatch.setattr(
        protocol, "lr_select_loss", lambda task, opt, lr, seed, n: losses[lr, n]
    )
    table = protocol.choose_learning_rates({("sine", "adam"): (32, 256)})
    assert table["chosen"] == {"sine": {"adam": 1e-3}}
    assert table["final_losses"]["sine"]["adam"]["0.003"] == {"32": 0.7, "256": 1.3}


def test_the_learning_rate_table_covers_every_size_it_serves():
    """The shipped table was chosen over the sizes the studies run each pair
    at; a study that adds a size or a pair makes this fail until it is redone."""
    from sparse_rtrl.experiments.protocol import lr_select_sizes

    table = cfg.learning_rates()
    sizes = {tuple(k.split("/")): tuple(v) for k, v in table["sizes"].items()}
    assert sizes == lr_select_sizes()
    for task, optimizer in sizes:
        assert table["chosen"][task][optimizer] in table["grid"][optimizer]
