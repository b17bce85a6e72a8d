"""Quality: held-out loss of DiLoCo (fp32 and int8 reduce) vs a data-parallel baseline at equal tokens.

    python benchmarks/quality.py            # ~8-15 min on 2 CPU cores (load-dependent): 5 arms x 250 inner steps
    python benchmarks/quality.py --quick    # ~2 min smoke version (40 steps, H 10/20, batch 2, small eval)

The DiLoCo papers' protocol (Douillard et al., arXiv 2311.08105, Table/Fig. "compute budget"), scaled down: the debug
Llama (configs/debug.toml) on the python-stdlib demo corpus, seq_len 128, the same inner AdamW and schedule in every
arm, and the same token stream in every arm:

* ``ddp``: one island whose batch is ``islands x per-island batch`` (data-parallel training over ``islands`` workers
  computes exactly this gradient; a 4-island H=1 DiLoCo would instead average parameters after an AdamW step);
* ``diloco H=.. fp32`` / ``int8``: ``islands`` islands of ``per-island batch`` each, outer SGD + Nesterov (lr 0.7,
  momentum 0.9, INTELLECT-1's), cross-island reduce in float32 (``diloco.compression="none"``) or int8.

Both layouts read ``islands x per-island batch`` slots with the same data seed, and slot ``island * B + row`` of a
DiLoCo run is row ``island * B + row`` of the baseline, so every arm sees exactly the same tokens in the same steps.

Held-out set: the prepared corpus is split by document (every ``--heldout-every``-th document is held out) into two
prepared datasets with the same tokenizer; training reads only the train split. (The BPE tokenizer itself was trained
on the whole corpus; no model parameter sees the held-out documents.)

Wire bytes: per island over the whole run. DiLoCo: bytes of one outer step x outer steps, from
``collective.wire_bytes_per_island`` and cross-checked against the collectives of the compiled sync program. Baseline:
a float32 ring all-reduce of the gradients every inner step among ``islands`` workers
(``collective.ring_allreduce_bytes_per_island``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

ISLAND_DEVICES = 4  # one simulated CPU device per island: the fewest that host a 4-island mesh


def split_corpus(src_dir: Path, out_root: Path, every: int) -> tuple[Path, Path]:
    """Writes ``out_root/train`` and ``out_root/heldout`` (documents k % every == 0) from a prepared dataset.

    Already-tokenized documents are copied, so this takes seconds; skipped when both splits exist for this source.
    """
    from intellect_jax.data import ShardSource, read_manifest
    from intellect_jax.prepare_data import write_dataset

    src = ShardSource(src_dir, verify_checksums=False)
    m = src.manifest.raw
    key = {"split_of": str(src_dir), "source_tokens": m["tokens"], "tokenizer_sha256": m["tokenizer_sha256"],
           "heldout_every": every}
    train_dir, held_dir = out_root / "train", out_root / "heldout"
    try:
        if all(read_manifest(d).raw.get("split") == key for d in (train_dir, held_dir)):
            return train_dir, held_dir
    except Exception:  # noqa: BLE001 - missing or stale: rewrite
        pass
    for d, keep in ((train_dir, lambda k: k % every != 0), (held_dir, lambda k: k % every == 0)):
        d.mkdir(parents=True, exist_ok=True)
        tok = src.manifest.path / (m.get("tokenizer_file") or "tokenizer.json")
        if tok.is_file():
            shutil.copyfile(tok, d / "tokenizer.json")
        write_dataset(d, (src.doc(k) for k in range(src.num_docs) if keep(k)), eos_id=m["eos_id"],
                      vocab_size=m["vocab_size"], tokenizer_sha256=m["tokenizer_sha256"],
                      eos_token=m.get("eos_token", ""), extra={"split": key})
    return train_dir, held_dir


def arm_configs(base, args, train_dir: Path) -> list[tuple[str, object]]:
    from intellect_jax.config import MeshConfig, SourceConfig

    n, B = args.islands, args.per_island_batch
    optim = dataclasses.replace(base.optim, total_steps=args.steps, warmup_steps=max(1, args.steps // 15),
                                decay_start=int(args.steps * 0.8))
    data = dataclasses.replace(base.data, seq_len=args.seq_len, batch_size=B, prefetch=2,
                               sources=(SourceConfig(name="stdlib-train", path=str(train_dir)),))
    run = dataclasses.replace(base.run, steps=args.steps, seed=args.seed)
    common_cfg = base.replace(optim=optim, run=run)
    arms = [("ddp (1 island, batch x%d)" % n,
             common_cfg.replace(data=dataclasses.replace(data, batch_size=n * B),
                                mesh=MeshConfig(islands=1, data=1, fsdp=1, tensor=1)))]
    for H in args.H:
        for comp, label in (("none", "fp32"), ("int8", "int8")):
            arms.append((f"diloco H={H} {label}", common_cfg.replace(
                data=data, mesh=MeshConfig(islands=n, data=1, fsdp=1, tensor=1),
                diloco=dataclasses.replace(base.diloco, inner_steps=H, compression=comp))))
    return arms


def heldout_batches(held_dir: Path, cfg, rows: int, batches: int) -> list[dict]:
    from intellect_jax import data
    from intellect_jax.config import SourceConfig

    dcfg = dataclasses.replace(cfg.data, batch_size=rows, prefetch=0, seed=12345,
                               sources=(SourceConfig(name="stdlib-heldout", path=str(held_dir)),))
    with data.make_iterator(dcfg, vocab_size=cfg.model.vocab_size, num_islands=1) as it:
        return [{k: v[0] for k, v in next(it).items()} for _ in range(batches)]


def make_eval(cfg):
    """Mean held-out cross-entropy (nats/token, no z-loss) of host params, on the first device."""
    import jax

    from intellect_jax.state import ModelSetup
    from intellect_jax.train_step import make_loss_fn

    setup = ModelSetup.build(cfg.model, cfg.optim)
    loss_fn = make_loss_fn(setup.graphdef, 0.0)
    sums = jax.jit(lambda p, b: (loss_fn(p, b)[1][0], b["loss_mask"].sum()))

    def evaluate(params, batches) -> float:
        params = jax.device_put(jax.device_get(params), jax.devices()[0])
        ce = tok = 0.0
        for b in batches:
            c, t = sums(params, b)
            ce, tok = ce + float(c), tok + float(t)
        return ce / tok

    return evaluate


def sync_wire_bytes_from_hlo(trainer) -> int | None:
    """Bytes one island sends per outer step, counted from the compiled sync program's island-axis collectives.

    all-to-all / all-gather over n islands send (n-1)/n of their result; a ring all-reduce sends 2 (n-1)/n of it.
    Valid when one device holds one island (the layout used here).
    """
    import numpy as np

    from intellect_jax import collective

    try:
        hlo = trainer.sync._sync.lower(trainer.state).compile().as_text()
    except Exception:  # noqa: BLE001 - a private attribute; report n/a rather than fail the benchmark
        return None
    n = trainer.num_islands
    total = 0.0
    for (op, dt), elements in collective.island_traffic(hlo, trainer.mesh).items():
        if op.startswith("other:"):
            continue
        size = np.dtype({"s8": np.int8, "u8": np.uint8, "f32": np.float32, "bf16": np.float16,
                         "s32": np.int32}.get(dt, np.float32)).itemsize
        factor = 2 if op == "all-reduce" else 1
        total += factor * (n - 1) / n * elements * size
    return int(round(total))


def run_arm(name: str, cfg, args, evaluate, eval_set, devices) -> dict:
    import jax

    from intellect_jax import collective, data
    from intellect_jax import sharding as sh
    from intellect_jax.info import count_params
    from intellect_jax.trainer import Trainer

    t0 = time.perf_counter()
    mesh = sh.make_mesh(cfg.mesh, devices=devices[:cfg.mesh.islands])
    trainer = Trainer(cfg, mesh=mesh)
    n = trainer.num_islands
    nparams = count_params(cfg.model).total_params
    diloco = trainer.sync.mode == "diloco"
    every = args.eval_every
    curve, train_losses = [], []
    pending = []
    loader = data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=n)
    try:
        for step in range(cfg.run.steps):
            # One program in flight at a time: with several queued, the simulated CPU devices (jax 0.10.2, 2 busy
            # cores) twice deadlocked in an all-gather (3 of 4 device threads waiting); timing is not measured here.
            pending.append(jax.block_until_ready(trainer.inner_step(trainer.make_batch(next(loader)))["loss"]))
            trainer.sync.maybe(step + 1, report=lambda record, ready_at: None)  # the outer step when due
            if (step + 1) % every == 0 or step + 1 == cfg.run.steps:
                train_losses += [float(jax.numpy.mean(x)) for x in jax.device_get(pending)]
                pending = []
                curve.append((step + 1, evaluate(trainer.global_params(), eval_set)))
                print(f"  {name}: step {step + 1}/{cfg.run.steps} train {train_losses[-1]:.4f} "
                      f"held-out {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        loader.close()
    tokens = cfg.run.steps * n * cfg.data.batch_size * cfg.data.seq_len
    if diloco:
        per_outer = trainer.sync.wire_bytes
        hlo_bytes = sync_wire_bytes_from_hlo(trainer)
        wire = per_outer * (cfg.run.steps // cfg.diloco.inner_steps)
    else:
        workers = args.islands  # the baseline stands for `islands` data-parallel workers
        per_outer = collective.ring_allreduce_bytes_per_island(nparams, workers)
        hlo_bytes = None
        wire = per_outer * cfg.run.steps
    return {"name": name, "eval_loss": curve[-1][1], "curve": curve, "train_losses": train_losses,
            "final_train_loss": sum(train_losses[-every:]) / len(train_losses[-every:]),
            "tokens": tokens, "wire_bytes": wire, "bytes_per_sync": per_outer, "hlo_bytes_per_sync": hlo_bytes,
            "H": cfg.diloco.inner_steps if diloco else 1, "params": nparams, "seconds": time.perf_counter() - t0}


def report(results: list[dict], args, seconds: float) -> str:
    from benchmarks.common import table

    base = results[0]
    rows = []
    for r in results:
        gap = 100.0 * (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
        bits = 8.0 * r["wire_bytes"]
        hlo = f"{r['hlo_bytes_per_sync'] / 1e6:.3f}" if r["hlo_bytes_per_sync"] else "–"
        rows.append([r["name"], f"{r['tokens']:,}", f"{r['eval_loss']:.4f}",
                     "–" if r is base else f"{gap:+.2f}%", f"{r['final_train_loss']:.4f}",
                     f"{bits / 1e9:.3f}", f"{r['bytes_per_sync'] / 1e6:.3f}", hlo,
                     f"{bits / (r['params'] * args.steps):.3f}",
                     "1x" if r is base else f"{base['wire_bytes'] / r['wire_bytes']:.0f}x less",
                     f"{r['seconds']:.0f}"])
    header = ["arm", "tokens", "held-out loss", "gap vs ddp", f"train loss (last {args.eval_every} steps)",
              "Gbit sent / island",
              "MB per sync (formula)", "MB per sync (compiled HLO)", "bits / param / inner step", "wire vs ddp",
              "wall s"]
    p = results[0]["params"]
    notes = (f"Model: debug Llama ({p / 1e6:.2f}M params), seq_len {args.seq_len}; {args.islands} islands x "
             f"{args.per_island_batch} sequences (ddp: 1 island x {args.islands * args.per_island_batch}); "
             f"{args.steps} inner steps per arm, inner AdamW lr 3e-3 WSD-sqrt (warmup {max(1, args.steps // 15)}, "
             f"decay from step {int(args.steps * 0.8)}); DiLoCo outer SGD+Nesterov lr 0.7 momentum 0.9; seed "
             f"{args.seed}. Held-out loss: mean cross-entropy (nats/token) of the global params after the last "
             f"inner step (DiLoCo: after the last outer step) on {args.eval_batches} x {args.eval_rows} x "
             f"{args.seq_len} tokens of held-out documents (every {args.heldout_every}th document of the corpus, "
             f"never trained on). Train loss: mean over the last {args.eval_every} inner steps (DiLoCo: the "
             f"islands' inner losses, i.e. of the diverging island params, not of the global params). Wire: "
             f"bytes one island sends over the run; ddp = a {args.islands}-worker fp32 ring all-reduce of the "
             f"gradients every step, 2(n-1)/n x 4 B x params. 'compiled HLO' counts the island-axis collectives of "
             f"the compiled sync program ((n-1)/n of all-to-all/all-gather results, 2(n-1)/n of all-reduce); the "
             f"formula omits per-leaf block padding, which the HLO count includes.")
    return table(header, rows), notes


def plot(results: list[dict], args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from benchmarks.common import save_plot

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps, losses = zip(*r["curve"])
        a.plot(steps, losses, marker="o", label=r["name"])
        b.plot(range(1, len(r["train_losses"]) + 1), r["train_losses"], lw=0.8, label=r["name"])
    a.set(xlabel="inner step (equal tokens per step in every arm)", ylabel="held-out loss (nats/token)",
          title="Held-out loss")
    b.set(xlabel="inner step", ylabel="train loss (mean over islands)", title="Training loss")
    b.set_ylim(top=min(8.5, max(max(r["train_losses"][len(r["train_losses"]) // 10:]) for r in results) + 0.2))
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    name = "quality_quick.png" if args.quick else "quality.png"
    path = save_plot(fig, name)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="~2 min smoke version (40 steps, H 10 20, batch 2 per island, small eval)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per arm (default 250; --quick: 40)")
    ap.add_argument("--H", type=int, nargs="+", default=None, help="DiLoCo inner steps per outer step (10 50)")
    ap.add_argument("--islands", type=int, default=4)
    ap.add_argument("--per-island-batch", type=int, default=None, help="sequences per island per step (4; --quick: 2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-rows", type=int, default=None, help="held-out sequences per eval batch (32)")
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out eval batches (8; --quick: 2)")
    ap.add_argument("--heldout-every", type=int, default=10, help="hold out every k-th document")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="~/.cache/intellect-jax/python-stdlib-bpe4096",
                    help="the prepared python-stdlib corpus (prepared if missing)")
    ap.add_argument("--split-dir", default="~/.cache/intellect-jax/bench-quality-split")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone (--quick never "
                    "writes it)")
    args = ap.parse_args()
    args.steps = args.steps or (40 if args.quick else 250)
    args.H = args.H or ([10, 20] if args.quick else [10, 50])
    args.per_island_batch = args.per_island_batch or (2 if args.quick else 4)
    args.eval_rows = args.eval_rows or (16 if args.quick else 32)
    args.eval_batches = args.eval_batches or (2 if args.quick else 8)
    bad = [h for h in args.H if args.steps % h]
    if bad:
        ap.error(f"--steps {args.steps} must be a multiple of every H (not of {bad}) so each arm ends synced")
    args.eval_every = max(args.H)
    for h in args.H:
        if args.eval_every % h:
            args.eval_every = args.steps  # evaluate only at the end when the H do not nest
    common.force_cpu_devices(max(ISLAND_DEVICES, args.islands))

    import jax

    from intellect_jax import data
    from intellect_jax.config import DataConfig, SourceConfig, load_config

    t_all = time.perf_counter()
    corpus = SourceConfig(name="python-stdlib", path=args.data, auto_prepare="python-stdlib")
    data.ensure_prepared(DataConfig(kind="prepared", sources=(corpus,)))
    train_dir, held_dir = split_corpus(Path(args.data).expanduser(), Path(args.split_dir).expanduser(),
                                       args.heldout_every)
    base = load_config(common.ROOT / "configs" / "debug.toml")
    arms = arm_configs(base, args, train_dir)
    eval_set = heldout_batches(held_dir, arms[0][1], args.eval_rows, args.eval_batches)
    evaluate = make_eval(arms[0][1])
    print(f"{len(arms)} arms x {args.steps} inner steps; held-out set {args.eval_batches} x {args.eval_rows} x "
          f"{args.seq_len} tokens from {held_dir}", flush=True)
    results = [run_arm(name, cfg, args, evaluate, eval_set, jax.devices()) for name, cfg in arms]
    seconds = time.perf_counter() - t_all
    tab, notes = report(results, args, seconds)
    print()
    print(tab)
    print()
    print(notes)
    print(f"\ntotal {seconds:.0f} s")
    if args.quick:
        print("(--quick: a smoke run; RESULTS.md is left alone)")
    elif not args.no_write:
        png = plot(results, args)
        curves = {r["name"]: r["curve"] for r in results}
        body = "\n\n".join([common.provenance(seconds), tab, notes,
                            "Held-out loss at every evaluation (inner step, loss): `" + json.dumps(curves) + "`",
                            f"![quality]({png})" if png else "(matplotlib missing: no plot)"])
        common.write_section("Quality", body)
        print(f"wrote {common.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
