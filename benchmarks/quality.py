"""Quality: does DiLoCo reach data-parallel held-out loss at equal tokens, and at what fraction of the bits?

    python benchmarks/quality.py            # the protocol: outer-lr sweep, then the arms (~60 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # ~3 min smoke version of the same code path (RESULTS.md untouched)
    python benchmarks/quality.py --streaming --layers 4   # blocking DiLoCo vs streaming fragments (~40 min)
    python benchmarks/quality.py --paired-seeds 3   # fp32 vs int8 (vs int4 + EF) DiLoCo, seed by seed (~35 min)
    python benchmarks/quality.py --paired-seeds 3 --paired-codecs fp32-noise   # the noise floor of that comparison
    python benchmarks/quality.py --paired-seeds 3 --paired-codecs fp32-noise --paired-noise-draws 1 2  # more draws

The DiLoCo papers' comparison (Douillard et al., arXiv 2311.08105; Charles et al., arXiv 2503.09799), scaled to a
2-core CPU: a 3-layer debug Llama with a 512-entry BPE (configs/quality.toml says why) on the python-stdlib corpus, the
same inner AdamW and WSD schedule and the same tokens in every arm, held-out loss on documents never trained on,
evaluated every ``--eval-every`` steps. ``--preset debug.toml`` runs the same protocol at the demo's vocabulary of
4096.

Arms (``n = --islands`` islands of ``B = --per-island-batch`` sequences):

* ``ddp``: one model whose batch is ``n x B`` (n data-parallel workers compute exactly this gradient). Wire: a fp32
  ring all-reduce of the gradients among n workers every inner step.
* ``diloco M=1``: DiLoCo with one island of batch ``n x B`` (the ddp batch) and an outer optimizer.
* ``diloco M=n H=..``: n islands of batch B; outer SGD + Nesterov momentum at the best (outer lr, momentum) of the
  sweep for that H; cross-island mean in fp32, int8, or int4 with error feedback (``diloco.error_feedback``).

``--warmup K`` runs the first K steps of every DiLoCo run data-parallel (the ddp arm's exact steps: one model on all
islands' rows), then every island starts from that model and its AdamW state.

Same tokens: a DiLoCo run reads ``n`` streams of ``B`` rows, the baseline one stream of ``n x B`` rows, and slot
``island * B + row`` of the first is row ``island * B + row`` of the second (checked at start-up).

Engine: the islands are vmapped on one CPU device (``diloco.island_inner_step`` without a mesh axis) and the
cross-island mean is ``collective.reference_island_mean``, the collective's arithmetic on one device (tested against
the compiled collective: the same codes, means within one float32 ulp). Arms run as ``--jobs`` single-threaded
worker processes side by side. The sweep runs every (M, H) at every (outer lr, momentum) of ``--sweep-grid`` for
``--sweep-steps`` steps with the schedule compressed to that length; the arms then run ``--steps`` steps at each
(M, H)'s best setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

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


def heldout_batches(held_dir: Path, cfg, rows: int, batches: int) -> list[dict]:
    from intellect_jax import data
    from intellect_jax.config import SourceConfig

    dcfg = dataclasses.replace(cfg.data, batch_size=rows, prefetch=0, seed=12345,
                               sources=(SourceConfig(name="stdlib-heldout", path=str(held_dir)),))
    with data.make_iterator(dcfg, vocab_size=cfg.model.vocab_size, num_islands=1) as it:
        return [{k: v[0] for k, v in next(it).items()} for _ in range(batches)]


def make_eval(cfg):
    """Mean held-out cross-entropy (nats/token, no z-loss) of a params tree."""
    import jax

    from intellect_jax.state import ModelSetup
    from intellect_jax.train_step import make_loss_fn

    setup = ModelSetup.build(cfg.model, cfg.optim)
    loss_fn = make_loss_fn(setup.graphdef, 0.0)
    sums = jax.jit(lambda p, b: (loss_fn(p, b)[1][0], b["loss_mask"].sum()))

    def evaluate(params, batches) -> float:
        ce = tok = 0.0
        for b in batches:
            c, t = sums(params, b)
            ce, tok = ce + float(c), tok + float(t)
        return ce / tok

    return evaluate


# --------------------------------------------------------------------------------------------------------------------
# One arm (runs in a worker process)


def preset_config(args: dict):
    """The preset, with --layers applied."""
    from intellect_jax.config import load_config

    base = load_config(common.ROOT / "configs" / args["preset"])
    if args.get("layers"):
        base = base.replace(model=dataclasses.replace(base.model, num_hidden_layers=args["layers"]))
    return base


def arm_config(args: dict, arm: dict, train_dir: str):
    """The Config of an arm: the preset's model, the inner schedule compressed to the arm's length, its data."""
    from intellect_jax.config import DilocoConfig, SourceConfig

    base = preset_config(args)
    steps = arm["steps"]
    optim = dataclasses.replace(base.optim, total_steps=steps, warmup_steps=max(1, steps // 20),
                                decay_start=int(steps * 0.8),
                                learning_rate=base.optim.learning_rate * args.get("inner_lr_scale", 1.0))
    rows = args["per_island_batch"] * (args["islands"] if arm["islands"] <= 1 else 1)
    data = dataclasses.replace(base.data, seq_len=args["seq_len"], batch_size=rows, prefetch=2, seed=arm["seed"],
                               sources=(SourceConfig(name="stdlib-train", path=train_dir),))
    diloco = DilocoConfig(inner_steps=arm["H"], outer_lr=arm["outer_lr"],
                          outer_momentum=arm["momentum"],
                          compression=arm["compression"], error_feedback=arm["error_feedback"],
                          block_size=args["block_size"], fragments=arm.get("fragments", 1),
                          overlap_steps=arm.get("overlap", 0), merge_alpha=arm.get("alpha", 0.0))
    run = dataclasses.replace(base.run, steps=steps, seed=arm["seed"])
    return base.replace(optim=optim, data=data, diloco=diloco, run=run)


def train_arm(args: dict, arm: dict) -> dict:
    """Trains one arm; returns its held-out curve, train losses and wire bytes."""
    import jax
    import numpy as np

    from intellect_jax import collective, data, diloco, streaming
    from intellect_jax import sharding as sh
    from intellect_jax.config import MeshConfig
    from intellect_jax.info import count_params
    from intellect_jax.state import ModelSetup, init_params
    from intellect_jax.train_step import init_state, make_train_step

    t0 = time.perf_counter()
    cfg = arm_config(args, arm, args["train_dir"])
    eval_set = heldout_batches(Path(args["held_dir"]), cfg, args["eval_rows"], args["eval_batches"])
    evaluate = make_eval(cfg)
    setup = ModelSetup.build(cfg.model, cfg.optim)
    mesh = sh.make_mesh(MeshConfig(islands=1, data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    params, _ = init_params(setup, cfg.model, mesh, cfg.run.seed)
    step_fn = make_train_step(setup.graphdef, cfg.optim, setup.optimizer)
    n = arm["islands"]  # 0: ddp (no outer step)
    nparams = count_params(cfg.model).total_params
    if n == 0:
        state = jax.jit(lambda p: init_state(p, setup.optimizer))(params)
        inner = jax.jit(lambda s, b: step_fn(s, {k: v[0] for k, v in b.items()}), donate_argnums=0)
        sync = None
        global_params = lambda s: s.params  # noqa: E731
    else:
        outer = diloco.make_outer_optimizer(cfg.diloco)
        state = jax.jit(lambda p: diloco.init_state(p, lambda q: init_state(q, setup.optimizer), outer, n,
                                                    cfg.diloco.error_feedback))(params)
        if arm["warmup"]:
            state = ddp_warmup(state, step_fn, setup, loader_for(cfg, n), arm["warmup"], n)
        island_step = diloco.island_inner_step(step_fn, spmd_axis_name=None)

        def inner_fn(s, b):
            new_inner, metrics = island_step(s.inner, b)
            return s._replace(inner=new_inner), metrics

        inner = jax.jit(inner_fn, donate_argnums=0)
        reduce_mean = functools.partial(collective.reference_island_mean, compression=cfg.diloco.compression,
                                        block_size=cfg.diloco.block_size, return_sent=cfg.diloco.error_feedback)
        if arm.get("perturb"):
            reduce_mean = perturbed(reduce_mean, arm["perturb"], arm.get("draw", 0))
        sync = jax.jit(lambda s: diloco.outer_update(s, reduce_mean, outer), donate_argnums=0)
        global_params = lambda s: s.global_params  # noqa: E731
        stream = None
        if arm.get("fragments", 1) > 1 or arm.get("overlap", 0):
            stream = Streaming(cfg, state.global_params, outer, reduce_mean, n)
            state = state._replace(outer_opt_state=streaming.init_outer_states(stream.frags, outer,
                                                                             state.global_params))
            sync = None
    curve, train_losses, pending, outer_metrics = [], [], [], []
    loader = loader_for(cfg, max(n, 1), skip=arm["warmup"] if n else 0)
    try:
        for t in range(arm["warmup"] if n else 0, arm["steps"]):
            state, m = inner(state, next(loader))
            pending.append(m["loss"])
            if sync is not None and (t + 1) % arm["H"] == 0:
                state, om = sync(state)
                outer_metrics.append(float(om["delta_norm"]))
            if n and stream is not None:
                state = stream.maybe(state, t + 1, outer_metrics)
            if (t + 1) % args["eval_every"] == 0 or t + 1 == arm["steps"]:
                train_losses += [float(np.mean(x)) for x in jax.device_get(pending)]
                pending = []
                curve.append((t + 1, evaluate(global_params(state), eval_set)))
                if not np.isfinite(curve[-1][1]):
                    break  # diverged: the sweep records it
    finally:
        loader.close()
    H = arm["H"] if n else 1
    workers = args["islands"]
    if n == 0:
        per_sync, syncs = collective.ring_allreduce_bytes_per_island(nparams, workers), arm["steps"]
    elif n == 1:
        per_sync, syncs = 0, arm["steps"] // H  # one island: nothing crosses islands
    else:
        per_sync = collective.wire_bytes_per_island(nparams, n, cfg.diloco.compression, cfg.diloco.block_size)
        syncs = arm["steps"] // H
        if stream is not None:  # bytes of the fragments actually synced; peak = the largest fragment
            per_sync, syncs = stream.sent / max(stream.syncs, 1), stream.syncs
    peak = stream.peak if n > 1 and stream is not None else per_sync
    window = max(1, args["eval_every"])
    return {**arm, "eval_loss": curve[-1][1], "curve": curve, "train_loss": float(np.mean(train_losses[-window:])),
            "tokens": arm["steps"] * workers * args["per_island_batch"] * args["seq_len"], "params": nparams,
            "bytes_per_sync": per_sync, "wire_bytes": per_sync * syncs, "peak_bytes_in_flight": peak,
            "seconds": time.perf_counter() - t0,
            "delta_norms": outer_metrics}


def perturbed(reduce_mean, eps: float, draw: int = 0):
    """`reduce_mean` with every element of the mean times (1 + u), u uniform in [-eps, eps]: the paired comparison's
    noise floor (what a perturbation far below any codec's rounding does to the trajectory). The noise is drawn from
    a key folded with the mean's own bits, so the run stays deterministic; `draw` picks another noise sequence."""
    import jax
    import jax.numpy as jnp

    def reduce(tree):
        mean = reduce_mean(tree)
        leaves, treedef = jax.tree.flatten(mean)
        key = jax.random.key(draw)
        for x in leaves:
            key = jax.random.fold_in(key, jax.lax.bitcast_convert_type(jnp.sum(x.astype(jnp.float32)), jnp.int32))
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [x * (1 + jax.random.uniform(k, x.shape, x.dtype, -eps, eps))
                                            for x, k in zip(leaves, keys)])

    return reduce


class Streaming:
    """Streaming DiLoCo's schedule (streaming.py) around the arm's state: each fragment synced at its step, its mean
    applied `overlap_steps` later. Counts the bytes each fragment sync sends."""

    def __init__(self, cfg, global_params, outer, reduce_mean, n_islands: int):
        import jax

        from intellect_jax import collective, streaming
        from intellect_jax.schedule import Schedule

        c = cfg.diloco
        self.frags = streaming.Fragments(global_params, cfg.model.num_hidden_layers, c.fragments)
        self.H, self.tau = c.inner_steps, c.overlap_steps
        self.schedule = Schedule(c.inner_steps, c.fragments, c.overlap_steps)
        self.bytes = [collective.wire_bytes_per_island(self.frags.size(p, global_params), n_islands, c.compression,
                                                       c.block_size) for p in range(self.frags.count)]
        self.peak, self.sent, self.syncs, self.pending = max(self.bytes), 0, 0, None
        P = self.frags.count
        self.sync = [jax.jit(lambda s, p=p: streaming.sync_fragment(s, self.frags, p, reduce_mean, outer,
                                                                     c.merge_alpha), donate_argnums=0)
                     for p in range(P)]
        self.reduce = [jax.jit(lambda s, p=p: streaming.reduce_fragment(s, self.frags, p, reduce_mean),
                               donate_argnums=0) for p in range(P)]
        self.apply = [jax.jit(lambda s, d, p=p: streaming.apply_fragment(s, self.frags, p, d, outer, c.merge_alpha),
                              donate_argnums=0) for p in range(P)]

    def maybe(self, state, done: int, delta_norms: list):
        if self.pending is not None and self.pending[1] == done:
            p, _, delta = self.pending
            state, _ = self.apply[p](state, delta)
            self.pending = None
        p = self.schedule.due(done)
        if p is None:
            return state
        self.sent, self.syncs = self.sent + self.bytes[p], self.syncs + 1
        if self.tau == 0:
            state, m = self.sync[p](state)
        else:
            state, delta, m = self.reduce[p](state)
            self.pending = (p, done + self.tau, delta)
        delta_norms.append(float(m["delta_norm"]))
        return state


def loader_for(cfg, streams: int, skip: int = 0):
    """The arm's batch iterator, `skip` batches in (the data-parallel warm-up read them)."""
    from intellect_jax import data

    it = data.make_iterator(cfg.data, vocab_size=cfg.model.vocab_size, num_islands=streams)
    for _ in range(skip):
        next(it)
    return it


def ddp_warmup(state, step_fn, setup, loader, steps: int, n: int):
    """The first `steps` inner steps data-parallel (one model on all islands' rows: the ddp arm's exact steps), then
    every island starts from that model and its AdamW state, and the global params are that model."""
    import jax

    from intellect_jax import diloco
    from intellect_jax.train_step import init_state

    merge = lambda b: {k: v.reshape((1, -1) + v.shape[2:]) for k, v in b.items()}  # noqa: E731
    one = jax.jit(lambda s, b: step_fn(s, {k: v[0] for k, v in b.items()}), donate_argnums=0)
    ddp = jax.jit(lambda p: init_state(p, setup.optimizer))(state.global_params)
    try:
        for _ in range(steps):
            ddp, _ = one(ddp, merge(next(loader)))
    finally:
        loader.close()
    return state._replace(inner=diloco.broadcast_islands(ddp, n), global_params=ddp.params)


def check_same_tokens(args: dict) -> None:
    """Slot island * B + row of the n-stream loader is row island * B + row of the 1-stream loader."""
    import numpy as np

    from intellect_jax import data

    n, B = args["islands"], args["per_island_batch"]
    per = arm_config(args, arm("check", 10, n), args["train_dir"])
    one = arm_config(args, arm("check", 10, 0), args["train_dir"])
    with data.make_iterator(per.data, vocab_size=per.model.vocab_size, num_islands=n) as a, \
            data.make_iterator(one.data, vocab_size=one.model.vocab_size, num_islands=1) as b:
        for _ in range(2):
            x, y = next(a), next(b)
            for k in x:
                assert np.array_equal(np.asarray(x[k]).reshape((1, n * B) + x[k].shape[2:]), np.asarray(y[k])), k


def _worker(payload: str) -> str:
    args, arm = json.loads(payload)
    return json.dumps(train_arm(args, arm))


def run_all(args: dict, arms: list[dict], jobs: int, label: str) -> list[dict]:
    """Runs arms in `jobs` worker processes (spawned: each starts its own single-threaded jax)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = [None] * len(arms)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, json.dumps([args, arm])): i for i, arm in enumerate(arms)}
        for f in as_completed(futures):
            r = json.loads(f.result())
            results[futures[f]] = r
            print(f"  [{label}] {r['name']}: held-out {r['eval_loss']:.4f} train {r['train_loss']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------------------------------
# The protocol


def arm(name, steps, islands, H=1, outer_lr=1.0, compression="none", error_feedback=False, seed=0, warmup=0,
        momentum=0.0, fragments=1, overlap=0, alpha=0.0, perturb=0.0, draw=0) -> dict:
    return dict(name=name, steps=steps, islands=islands, H=H, outer_lr=outer_lr, compression=compression,
                error_feedback=error_feedback, seed=seed, warmup=warmup, momentum=momentum, fragments=fragments,
                overlap=overlap, alpha=alpha, perturb=perturb, draw=draw)


def streaming_arms(args: dict) -> list[dict]:
    """Blocking DiLoCo against streaming fragments (P = --fragments) with overlap tau, at one H and outer setting."""
    n, S, H, P = args["islands"], args["steps"], args["streaming_H"], args["fragments"]
    lr, mom = args["streaming_outer"]
    arms = [arm(f"blocking DiLoCo M={n} H={H}", S, n, H, lr, momentum=mom)]
    arms.append(arm(f"streaming P={P} tau=0", S, n, H, lr, momentum=mom, fragments=P))
    for tau, alpha in args["streaming_taus"]:
        arms.append(arm(f"streaming P={P} tau={tau} alpha={alpha}", S, n, H, lr, momentum=mom, fragments=P,
                        overlap=tau, alpha=alpha))
    return arms


def model_desc(args: dict, params: int) -> str:
    m = preset_config(args).model
    return (f"{args['preset']} Llama ({params / 1e6:.2f}M params, {m.num_hidden_layers} layers, hidden "
            f"{m.hidden_size}, vocabulary {m.vocab_size})")


def streaming_report(results: list[dict], args: dict) -> tuple[str, str]:
    from benchmarks.common import table

    base = results[0]
    rows = []
    for r in results:
        rows.append([r["name"], f"{r['eval_loss']:.4f}", "–" if r is base else gap(r, base),
                     f"{r['train_loss']:.4f}", f"{8.0 * r['wire_bytes'] / 1e9:.3f}",
                     f"{r['peak_bytes_in_flight'] / 1e6:.3f}",
                     f"{r['peak_bytes_in_flight'] / base['peak_bytes_in_flight']:.2f}", f"{r['seconds']:.0f}"])
    tab = table(["arm", "held-out loss", "gap vs blocking", "train loss", "Gbit sent / island",
                 "MB per sync (peak in flight)", "peak vs blocking", "wall s"], rows)
    p = base["params"]
    notes = (f"Model: {model_desc(args, p)}, {args['islands']} islands x "
             f"{args['per_island_batch']} x {args['seq_len']} tokens, {args['steps']} inner steps per arm (the same "
             f"tokens in every arm), H = {args['streaming_H']}, outer (lr, momentum) = {args['streaming_outer']} "
             "(the sweep's best for this H), fp32 cross-island mean (collective.reference_island_mean). Streaming: "
             "layer l and vocabulary rows l mod P of the (tied) embedding in fragment l mod P, the final norm with "
             "the last layer's, "
             "fragment p synced at k H + p H / P, its mean applied tau steps later and merged as alpha x island + "
             "(1 - alpha) x global (intellect_jax/streaming.py). Peak in flight: the bytes one sync puts on the "
             "wire (the largest fragment), measured from the fragments' actual sizes. One seed per arm: the "
             "Quality section's second seed gives the seed-to-seed spread of blocking DiLoCo; gaps below it are "
             "within noise.")
    return tab, notes


def sweep_arms(args: dict) -> list[dict]:
    """Every (M, H) at every (outer lr, outer momentum) of the grid, plus ddp, at the sweep's length."""
    n, S = args["islands"], args["sweep_steps"]
    arms = [arm("ddp", S, 0, warmup=0)]
    for lr, mom in args["sweep_grid"]:
        arms.append(arm(f"diloco M=1 H={args['m1_H']} lr={lr} m={mom}", S, 1, args["m1_H"], lr, momentum=mom,
                        warmup=args["warmup"]))
        for H in args["H"]:
            arms.append(arm(f"diloco M={n} H={H} lr={lr} m={mom}", S, n, H, lr, momentum=mom, warmup=args["warmup"]))
    return arms


def best_settings(sweep: list[dict]) -> dict:
    """(islands, H) -> (outer lr, outer momentum) with the lowest final held-out loss in the sweep."""
    best: dict = {}
    for r in sweep:
        if r["islands"] == 0:
            continue
        key = (r["islands"], r["H"])
        if key not in best or r["eval_loss"] < best[key]["eval_loss"]:
            best[key] = r
    return {k: (v["outer_lr"], v["momentum"]) for k, v in best.items()}


def main_arms(args: dict, best: dict, best_H: int | None) -> list[dict]:
    n, S, w = args["islands"], args["steps"], args["warmup"] * args["steps"] // args["sweep_steps"]

    def dl(name, M, H, compression="none", ef=False):
        lr, mom = best[(M, H)]
        return arm(name, S, M, H, lr, compression, ef, momentum=mom, warmup=w)

    arms = [arm("ddp", S, 0), dl(f"diloco M=1 H={args['m1_H']}", 1, args["m1_H"])]
    arms += [dl(f"diloco M={n} H={H} fp32", n, H) for H in args["H"]]
    if best_H is not None:
        arms += [dl(f"diloco M={n} H={best_H} int8", n, best_H, "int8"),
                 dl(f"diloco M={n} H={best_H} int4 + error feedback", n, best_H, "int4", True)]
    return arms


def gap(r: dict, base: dict) -> str:
    return f"{100.0 * (r['eval_loss'] - base['eval_loss']) / base['eval_loss']:+.2f}%"


def sweep_table(sweep: list[dict], args: dict, lrs: dict | None = None) -> str:
    """The sweep's table (rows (islands, H), columns (outer lr, momentum)) and its note; `lrs` marks the best."""
    from benchmarks.common import table

    lrs = best_settings(sweep) if lrs is None else lrs
    # The sweep: rows (islands, H), columns outer lr.
    s_base = next(r for r in sweep if r["islands"] == 0)
    keys = sorted({(r["islands"], r["H"]) for r in sweep if r["islands"]}, key=lambda k: (k[0], k[1]))
    cell = {(r["islands"], r["H"], r["outer_lr"], r["momentum"]): r for r in sweep if r["islands"]}
    srows = []
    for k in keys:
        row = [f"M={k[0]} H={k[1]}"]
        for lr, mom in args["sweep_grid"]:
            r = cell.get((k[0], k[1], lr, mom))
            mark = " **best**" if r and lrs.get(k) == (lr, mom) else ""
            row.append(f"{r['eval_loss']:.4f} ({gap(r, s_base)}){mark}" if r else "–")
        srows.append(row)
    sweep_tab = table(["arm \\ outer lr, momentum", *[f"{lr}, {mom}" for lr, mom in args["sweep_grid"]]], srows)
    sweep_note = (f"Sweep: {args['sweep_steps']} inner steps per run (schedule compressed to that length), held-out "
                  f"loss at the end (gap vs ddp {s_base['eval_loss']:.4f} at the same length). Outer SGD + Nesterov "
                  f"(momentum 0: plain SGD on the mean pseudo-gradient; lr 1, momentum 0 is parameter averaging); "
                  f"best per row in bold; 'nan' = diverged.")
    return sweep_tab + "\n\n" + sweep_note


def report(sweep: list[dict], results: list[dict], args: dict, lrs: dict, best_H: int) -> tuple[str, str, str]:
    from benchmarks.common import table

    n = args["islands"]
    sweep_tab = sweep_table(sweep, args, lrs)
    base = next(r for r in results if r["islands"] == 0 and r["seed"] == 0)
    rows = []
    for r in results:
        seeds = [x for x in results if x["name"] == r["name"]]
        if r["seed"] != 0:
            continue
        other = [x for x in seeds if x["seed"] != 0]
        bits_step = 8.0 * r["wire_bytes"] / (r["params"] * r["steps"])
        rows.append([r["name"], "–" if r["islands"] == 0 else f"{r['outer_lr']}, {r['momentum']}",
                     f"{r['tokens']:,}", f"{r['eval_loss']:.4f}",
                     "–" if r is base else gap(r, base),
                     f"{other[0]['eval_loss']:.4f}" if other else "–",
                     f"{r['train_loss']:.4f}", f"{8.0 * r['wire_bytes'] / 1e9:.3f}", f"{bits_step:.3f}",
                     "1x" if r is base else ("no WAN" if not r["wire_bytes"] else
                                             f"{base['wire_bytes'] / r['wire_bytes']:.0f}x less"),
                     f"{r['seconds']:.0f}"])
    tab = table(["arm", "outer lr, momentum", "tokens", "held-out loss", "gap vs ddp", "held-out, seed 1", "train loss",
                 "Gbit sent / island", "bits / param / inner step", "wire vs ddp", "wall s"], rows)
    p = results[0]["params"]
    notes = (f"Model: {model_desc(args, p)}, seq_len {args['seq_len']}; {n} islands x "
             f"{args['per_island_batch']} sequences (ddp and M=1: one model, batch {n * args['per_island_batch']}); "
             f"{args['steps']} inner steps per arm (the same tokens in every arm), inner AdamW WSD-sqrt (warmup "
             f"{max(1, args['steps'] // 20)}, decay from step {int(args['steps'] * 0.8)}), as the preset otherwise. "
             f"Outer SGD + Nesterov at the sweep's best (lr, momentum) per (M, H); data-parallel warm-up: "
             f"{args['warmup'] * args['steps'] // args['sweep_steps']} steps; best H "
             f"(sweep) = {best_H}, used for the int8 / int4 arms. Held-out loss: mean cross-entropy (nats/token) of "
             f"the global params after the last outer step, on {args['eval_batches']} x {args['eval_rows']} x "
             f"{args['seq_len']} tokens of held-out documents (every {args['heldout_every']}th document, never "
             f"trained on). Noise: 'seed 1' reruns an arm with another init and data order (seed 1); the spread of "
             f"the two seeds is the noise floor for comparing arms. Train loss: mean over the last "
             f"{args['eval_every']} steps (DiLoCo: the islands' own losses). Wire: bytes one island sends over the "
             f"run (DiLoCo: collective.wire_bytes_per_island per outer step, codes + one fp32 scale per "
             f"{args['block_size']} elements; ddp: a {n}-worker fp32 ring all-reduce of the gradients every step, "
             f"2(n-1)/n x 4 B x params); M=1 sends nothing across islands.")
    return sweep_tab, tab, notes


def plot(results: list[dict], quick: bool) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from benchmarks.common import save_plot

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"])
        tokens = [s * r["tokens"] / r["steps"] / 1e6 for s in steps]
        label = r["name"] + (f" (seed {r['seed']})" if r["seed"] else "")
        style = "--" if r["seed"] else "-"
        a.plot(tokens, losses, style, marker=".", label=label)
        k = len(steps) // 2
        b.plot(tokens[k:], losses[k:], style, marker=".", label=label)
    a.set(xlabel="tokens (millions; equal per step in every arm)", ylabel="held-out loss (nats/token)",
          title="Held-out loss")
    b.set(xlabel="tokens (millions)", ylabel="held-out loss", title="Second half, zoomed")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    path = save_plot(fig, "quality_quick.png" if quick else "quality.png")
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~3 min smoke version (short runs, 2 lrs, small eval)")
    ap.add_argument("--preset", default="quality.toml", help="model preset in configs/ (default quality.toml); its "
                    "first data source is the corpus")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per arm (default 2000)")
    ap.add_argument("--sweep-steps", type=int, default=None, help="inner steps per sweep run (default 300)")
    ap.add_argument("--sweep-grid", nargs="+", default=None, metavar="LR,MOMENTUM",
                    help="outer (lr, momentum) pairs (default 0.7,0.5 1.0,0 1.3,0)")
    ap.add_argument("--warmup", type=int, default=0, help="data-parallel warm-up steps of a sweep run (the arms "
                    "scale it to their length); 0 = DiLoCo from the first step")
    ap.add_argument("--H", type=int, nargs="+", default=None, help="H for the M=islands arms (10 25 50)")
    ap.add_argument("--m1-H", type=int, default=25, help="H of the one-island DiLoCo arm")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's; the streaming "
                    "comparison needs at least --fragments)")
    ap.add_argument("--islands", type=int, default=4)
    ap.add_argument("--per-island-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 100)")
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out batches of eval-rows (default 6)")
    ap.add_argument("--heldout-every", type=int, default=10, help="hold out every k-th document")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2: one per core)")
    ap.add_argument("--data", default=None, help="the prepared corpus (default: the preset's first data source, "
                    "prepared if missing and it names a recipe)")
    ap.add_argument("--split-dir", default=None, help="where the train / held-out split is written (default: "
                    "~/.cache/intellect-jax/bench-quality-split-<corpus directory name>)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--streaming", action="store_true", help="run the streaming comparison instead of the protocol")
    ap.add_argument("--sweep-only", action="store_true", help="run the sweep only and print its table (explorations: "
                                                               "with --inner-lr-scale, --per-island-batch)")
    ap.add_argument("--inner-lr-scale", type=float, default=1.0, help="multiply the preset's inner learning rate "
                                                                      "(every arm)")
    ap.add_argument("--paired-seeds", type=int, default=0, help="run the compression comparison instead of the "
                    "protocol: fp32 DiLoCo and each of --paired-codecs at the same seed, for this many seeds")
    ap.add_argument("--paired-codecs", nargs="+", default=["int8"], choices=["int8", "int8-ef", "int4", "fp32-noise"],
                    help="codecs compared with fp32 by --paired-seeds (int4 always runs with error feedback, -ef adds "
                         "it to int8; fp32-noise: fp32 with the mean perturbed by --paired-noise, the noise floor; "
                         "default int8)")
    ap.add_argument("--paired-noise", type=float, default=1e-5, help="relative size of fp32-noise's perturbation")
    ap.add_argument("--paired-noise-draws", type=int, nargs="+", default=[0], metavar="D",
                    help="fp32-noise's noise sequences, one arm per seed each (default: draw 0)")
    ap.add_argument("--paired-H", type=int, default=10, help="H of the paired comparison (default 10: the "
                    "protocol's best)")
    ap.add_argument("--paired-outer", default="1.0,0", metavar="LR,MOMENTUM",
                    help="outer (lr, momentum) of the paired comparison (default 1.0,0: the sweep's best at H=10)")
    ap.add_argument("--streaming-H", type=int, default=25, help="H of the streaming comparison (default 25)")
    ap.add_argument("--streaming-outer", default="1.0,0", metavar="LR,MOMENTUM",
                    help="outer (lr, momentum) of the streaming comparison (default 1.0,0: the sweep's best at H=25)")
    ap.add_argument("--fragments", type=int, default=4, help="fragments of the streaming arms (default 4)")
    ap.add_argument("--streaming-taus", nargs="+", default=["1,0.5", "2,0.5", "5,0.5", "2,0"],
                    metavar="TAU,ALPHA", help="(overlap steps, merge alpha) arms (default 1,0.5 2,0.5 5,0.5 2,0)")
    a = ap.parse_args()
    q = a.quick
    a.steps = a.steps or (100 if q else 2000)
    a.sweep_steps = a.sweep_steps or (50 if q else 300)
    grid = a.sweep_grid or (["0.7,0.5", "1.0,0"] if q else ["0.7,0.5", "1.0,0", "1.3,0"])
    try:
        a.sweep_grid = [tuple(float(v) for v in g.split(",")) for g in grid]
        assert all(len(g) == 2 and g[0] > 0 and 0 <= g[1] < 1 for g in a.sweep_grid)
    except (ValueError, AssertionError):
        ap.error(f"--sweep-grid takes LR,MOMENTUM pairs with lr > 0 and 0 <= momentum < 1, got {grid}")
    a.H = a.H or ([10, 25] if q else [10, 25, 50])
    a.eval_every = a.eval_every or (50 if q else 100)
    a.eval_batches = a.eval_batches or (2 if q else 6)
    if q:
        a.m1_H = 25
    for name, steps in (("--steps", a.steps), ("--sweep-steps", a.sweep_steps), ("--eval-every", a.eval_every)):
        bad = [h for h in a.H + [a.m1_H] if steps % h]
        if bad:
            ap.error(f"{name} {steps} must be a multiple of every H (not of {bad}) so each arm ends synced and every "
                     "evaluation sees global params")
    if a.steps % a.eval_every:
        ap.error(f"--steps {a.steps} must be a multiple of --eval-every {a.eval_every}")
    # One single-threaded CPU device per worker: `jobs` workers keep the cores busy without fighting.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
                               " --xla_cpu_multi_thread_eigen=false").strip()
    t_all = time.perf_counter()
    from intellect_jax import data
    from intellect_jax.config import DataConfig, load_config

    corpus = load_config(common.ROOT / "configs" / a.preset).data.sources[0]
    if a.data:
        corpus = dataclasses.replace(corpus, path=a.data)
    a.data = corpus.path
    a.split_dir = a.split_dir or f"~/.cache/intellect-jax/bench-quality-split-{Path(a.data).name}"
    data.ensure_prepared(DataConfig(kind="prepared", sources=(corpus,)))
    train_dir, held_dir = split_corpus(Path(a.data).expanduser(), Path(a.split_dir).expanduser(), a.heldout_every)
    args = {k: v for k, v in vars(a).items()} | {"train_dir": str(train_dir), "held_dir": str(held_dir)}
    check_same_tokens(args)
    if a.streaming:
        return main_streaming(args, a, t_all)
    if a.paired_seeds:
        return main_paired(args, a, t_all)
    print(f"sweep: {len(sweep_arms(args))} runs x {a.sweep_steps} steps; then arms x {a.steps} steps; "
          f"{a.jobs} workers", flush=True)
    sweep = run_all(args, sweep_arms(args), a.jobs, "sweep")
    if a.sweep_only:
        print("\n" + sweep_table(sweep, args) + f"\n\ntotal {time.perf_counter() - t_all:.0f} s")
        return 0
    lrs = best_settings(sweep)
    best_H = min(a.H, key=lambda H: min(r["eval_loss"] for r in sweep if r["islands"] == a.islands and r["H"] == H))
    arms = main_arms(args, lrs, best_H)
    arms += [dict(x, seed=1) for x in arms if x["islands"] == 0 or
             (x["islands"] == a.islands and x["H"] == best_H and x["compression"] == "none")]
    print(f"best outer (lr, momentum) per (M, H): {lrs}; best H {best_H}; {len(arms)} arms x {a.steps} steps", flush=True)
    results = run_all(args, arms, a.jobs, "arms")
    seconds = time.perf_counter() - t_all
    sweep_tab, tab, notes = report(sweep, results, args, lrs, best_H)
    print("\n" + sweep_tab + "\n\n" + tab + "\n\n" + notes + f"\n\ntotal {seconds:.0f} s")
    if q or a.no_write:
        print("(RESULTS.md left alone: --quick or --no-write)")
        return 0
    png = plot(results, q)
    curves = {r["name"] + (f" seed {r['seed']}" if r["seed"] else ""): r["curve"] for r in results}
    body = "\n\n".join([common.provenance(seconds), "Arms:", tab, notes, "Outer learning-rate sweep:", sweep_tab,
                        "Held-out loss at every evaluation (inner step, loss): `" + json.dumps(curves) + "`",
                        f"![quality]({png})" if png else "(matplotlib missing: no plot)"])
    common.write_section("Quality", body)
    print(f"wrote {common.RESULTS}")
    return 0


def main_streaming(args: dict, a, t_all: float) -> int:
    layers = preset_config(args).model.num_hidden_layers
    if layers < a.fragments:
        raise SystemExit(f"--fragments {a.fragments} needs at least that many layers ({a.preset} has {layers}; "
                         f"fragments are split by layer): pass --layers {a.fragments} or fewer --fragments")
    lr, mom = (float(v) for v in a.streaming_outer.split(","))
    args["streaming_outer"] = (lr, mom)
    args["streaming_taus"] = [(int(t.split(",")[0]), float(t.split(",")[1])) for t in a.streaming_taus]
    if a.quick:
        args["streaming_taus"] = args["streaming_taus"][:1]
    arms = streaming_arms(args)
    print(f"streaming comparison: {len(arms)} arms x {a.steps} steps; {a.jobs} workers", flush=True)
    results = run_all(args, arms, a.jobs, "streaming")
    seconds = time.perf_counter() - t_all
    tab, notes = streaming_report(results, args)
    print("\n" + tab + "\n\n" + notes + f"\n\ntotal {seconds:.0f} s")
    if a.quick or a.no_write:
        print("(RESULTS.md left alone: --quick or --no-write)")
        return 0
    curves = {r["name"]: r["curve"] for r in results}
    common.write_section("Quality: streaming DiLoCo", "\n\n".join([
        common.provenance(seconds), tab, notes,
        "Held-out loss at every evaluation (inner step, loss): `" + json.dumps(curves) + "`"]))
    print(f"wrote {common.RESULTS}")
    return 0


def paired_arms(args: dict) -> list[dict]:
    """fp32 DiLoCo and each codec at one (H, outer setting), for seeds 0 .. paired_seeds - 1."""
    n, S, H = args["islands"], args["steps"], args["paired_H"]
    lr, mom = args["paired_outer"]
    out = []
    for seed in range(args["paired_seeds"]):
        out.append(arm(f"diloco M={n} H={H} fp32", S, n, H, lr, seed=seed, momentum=mom))
        for c in args["paired_codecs"]:
            if c == "fp32-noise":
                eps = args["paired_noise"]
                for d in args["paired_noise_draws"]:
                    out.append(arm(f"diloco M={n} H={H} fp32 x (1 ± {eps:g})" + (f" draw {d}" if d else ""), S, n,
                                   H, lr, seed=seed, momentum=mom, perturb=eps, draw=d))
                continue
            codec, ef = c.split("-")[0], c == "int4" or c.endswith("-ef")
            name = f"diloco M={n} H={H} {codec}" + (" + error feedback" if ef else "")
            out.append(arm(name, S, n, H, lr, codec, ef, seed=seed, momentum=mom))
    return out


def paired_report(results: list[dict], args: dict) -> tuple[str, str]:
    """Per seed: fp32's held-out loss and each codec's gap to it at the same seed; then the mean and spread of those
    paired gaps (the codec's effect with the seed-to-seed variation taken out)."""
    import numpy as np

    from benchmarks.common import table

    codecs = [r["name"] for r in results if r["seed"] == 0 and (r["compression"] != "none" or r["perturb"])]
    fp32 = {r["seed"]: r for r in results if r["compression"] == "none" and not r["perturb"]}
    gaps = {c: [] for c in codecs}
    rows = []
    for seed in sorted(fp32):
        row = [str(seed), f"{fp32[seed]['eval_loss']:.4f}"]
        for c in codecs:
            r = next(x for x in results if x["name"] == c and x["seed"] == seed)
            gaps[c].append(100.0 * (r["eval_loss"] - fp32[seed]["eval_loss"]) / fp32[seed]["eval_loss"])
            row += [f"{r['eval_loss']:.4f}", f"{gaps[c][-1]:+.2f}%"]
        rows.append(row)
    fl = np.array([fp32[s]["eval_loss"] for s in sorted(fp32)])
    summary = ["mean ± sd", f"{fl.mean():.4f} ± {fl.std(ddof=1) if len(fl) > 1 else 0:.4f}"]
    for c in codecs:
        g = np.array(gaps[c])
        summary += ["", f"{g.mean():+.2f}% ± {g.std(ddof=1) if len(g) > 1 else 0:.2f}%"]
    rows.append(summary)
    bits = ["bits / param / inner step", f"{8.0 * fp32[0]['wire_bytes'] / (fp32[0]['params'] * fp32[0]['steps']):.3f}"]
    for c in codecs:
        r = next(x for x in results if x["name"] == c and x["seed"] == 0)
        bits += [f"{8.0 * r['wire_bytes'] / (r['params'] * r['steps']):.3f}", ""]
    rows.append(bits)
    head = ["seed", "fp32 held-out"]
    for c in codecs:
        short = c.split(f"H={args['paired_H']} ")[1]
        head += [f"{short} held-out", f"{short} vs fp32"]
    n_seeds = len(fl)
    notes = (f"Model: {model_desc(args, results[0]['params'])}, seq_len {args['seq_len']}; {args['islands']} islands "
             f"x {args['per_island_batch']} sequences, {args['steps']} inner steps per arm (the same tokens in every "
             f"arm), H = {args['paired_H']}, outer (lr, momentum) = {args['paired_outer']}, block size "
             f"{args['block_size']}; held-out loss as in the Quality section. Paired: each codec runs at the same "
             f"seed (init and data order) as the fp32 arm of its row, so its gap is the codec's effect plus the "
             f"chaos one perturbation of the trajectory sets off; the mean over {n_seeds} seeds estimates the "
             f"effect and 'sd' (sample standard deviation over seeds) its noise; the standard error of the mean is "
             f"sd / sqrt({n_seeds}). The fp32 column's sd is the seed-to-seed spread of the loss itself.")
    if any(r["perturb"] for r in results):
        notes += (f" 'fp32 x (1 ± {args['paired_noise']:g})': exact fp32 DiLoCo whose mean pseudo-gradient is "
                  "multiplied element-wise by 1 + u, u uniform in ± that (deterministic noise, about 1000x below "
                  "int8's rounding): its gap is the chaos floor, the part of any codec's paired gap a codec "
                  "cannot be blamed for.")
        if args["paired_noise_draws"] != [0]:
            notes += " 'draw d': the same with noise sequence d (jax.random.key(d)); no suffix: draw 0."
    return table(head, rows), notes


def main_paired(args: dict, a, t_all: float) -> int:
    args["paired_outer"] = tuple(float(v) for v in a.paired_outer.split(","))
    if a.steps % a.paired_H:
        raise SystemExit(f"--steps {a.steps} must be a multiple of --paired-H {a.paired_H}")
    arms = paired_arms(args)
    print(f"paired comparison: {len(arms)} arms x {a.steps} steps; {a.jobs} workers", flush=True)
    results = run_all(args, arms, a.jobs, "paired")
    seconds = time.perf_counter() - t_all
    tab, notes = paired_report(results, args)
    print("\n" + tab + "\n\n" + notes + f"\n\ntotal {seconds:.0f} s")
    if a.quick or a.no_write:
        print("(RESULTS.md left alone: --quick or --no-write)")
        return 0
    curves = {f"{r['name']} seed {r['seed']}": r["curve"] for r in results}
    title = ("Quality: the paired comparison's noise floor" if args["paired_codecs"] == ["fp32-noise"]
             else "Quality: compression, paired seeds")
    if "fp32-noise" in args["paired_codecs"] and args["paired_noise_draws"] != [0]:
        title += ", noise draws " + ", ".join(map(str, args["paired_noise_draws"]))
    common.write_section(title, "\n\n".join([
        common.provenance(seconds), tab, notes,
        "Held-out loss at every evaluation (inner step, loss): `" + json.dumps(curves) + "`"]))
    print(f"wrote {common.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
