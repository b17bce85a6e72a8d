"""In-program cross-island mean: a shard_map over the mesh that moves int8 (or int4) codes across the island axis.

Islands are the mesh axis ``island``; per-island state has a leading island dimension sharded
``P("island", *inner)``. Devices at the same inner coordinate of different islands hold the same logical slice, so
the reduce is local except for two collectives over the island axis (DiLoCo outer step; Douillard et al. 2023,
arXiv:2311.08105; int8 all-reduce as in INTELLECT-1, arXiv:2412.01152):

    local leaves --ravel, pad each to whole blocks, concat, pad, (replicas: take own part)--> v [n*C]
    --pack--> codes [n, C], scales [n, C/block]
    all_to_all(island): island i receives chunk i from every island    (s8 codes, u8 for int4, + f32 scales)
    unpack, mean over islands in float32 (the owned chunk)
    pack the mean ONCE --all_gather(island)--> codes [n * C] + scales  (the same dtypes on the wire)
    (replicas: all_gather the codes and scales of the parts over the replicated inner axes)
    unpack every chunk (every island decodes the same bytes -> bit-identical results) --unpad, split--> leaves

Layout and padding: leaves are grouped by the inner axes they are replicated over (below); within a group every local
leaf is raveled and zero-padded to whole blocks (so no block, hence no scale, mixes two leaves), the leaves are
concatenated in tree-flatten order, and the vector is zero-padded to ``padded_size(L, block_size, n * r)`` so every
chunk is a whole number of blocks. Zeros quantize to zero and the padding is dropped after the gather. The layout is
a function of static local shapes only, so every device computes the same positions.
A psum of int8 would overflow, and a psum of float32 would put 4 bytes per parameter on the slow link.

Replicated leaves: a leaf replicated over inner axes (a norm under fsdp; every leaf when params are replicated over
"data") would otherwise be sent once by each replica. Leaves are therefore grouped by their replicated axes; the r
replicas split the group's vector r ways (padded to n * r whole blocks), each runs the island reduce on its part, and
an all_gather of the codes over the replicated axes (inside the island, fast links) reassembles it. Every replica
decodes the same bytes, so replicas stay bit-identical too. Groups too small for the split to save bytes (the padding
to n * r blocks would outweigh it) are merged into the unsplit vector and sent by every replica.

``compression="none"`` is the exact float32 baseline: a pmean over the island axis.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from intellect_jax import quant
from intellect_jax.codecs import make_codec
from intellect_jax.sharding import ISLAND


def inner_spec(spec: P, island_axis: str = ISLAND) -> P:
    """The PartitionSpec of one island's copy: ``spec`` without its leading island entry."""
    if len(spec) == 0 or spec[0] != island_axis:
        raise ValueError(f"every spec must start with {island_axis!r}, got {spec}")
    return P(*spec[1:])


def make_island_mean(mesh, specs, *, compression: str = "int8", block_size: int = 256,
                     island_axis: str = ISLAND, return_sent: bool = False) -> Callable[[Any], Any]:
    """Build ``reduce_mean(tree) -> tree``: the mean over the leading island dim of every leaf.

    Args:
      mesh: a Mesh containing ``island_axis``.
      specs: pytree of PartitionSpecs (same structure as the input), each starting with ``island_axis``.
      compression: "int8" (default), "int4", or "none" (exact float32 pmean baseline).
      block_size: elements per quantization block (one float32 scale each).
      return_sent: also return what each island actually contributed (its own codes, decoded), for error feedback.
    Returns:
      A function (jit-able, pure) mapping a tree of [n_islands, ...] arrays to a tree of [...] arrays sharded by
      the inner specs and replicated over the island axis, every island's copy bit-identical. With
      ``return_sent``: ``(mean, sent)``, ``sent`` float32 shaped and sharded like the input (``none``: the input).
    """
    codec = make_codec(compression, block_size)
    if island_axis not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {island_axis!r}")
    n = mesh.shape[island_axis]
    spec_leaves, spec_def = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
    out_specs = jax.tree.unflatten(spec_def, [inner_spec(s, island_axis) for s in spec_leaves])

    def local_mean_exact(tree):
        mean = jax.tree.map(lambda x: jax.lax.pmean(x[0], island_axis), tree)
        return (mean, jax.tree.map(lambda x: x.astype(jnp.float32), tree)) if return_sent else mean

    # Leaves are grouped by the inner axes they are replicated over (a norm under fsdp, every leaf under a "data"
    # axis that replicates params). The r replicas of a group split its vector r ways, each sends only its part
    # across islands, and an all_gather over those (intra-island, fast) axes reassembles the codes afterwards.
    inner_axes = [a for a in mesh.axis_names if a != island_axis]
    groups: dict[tuple[str, ...], list[int]] = {}
    for k, s in enumerate(spec_leaves):
        used = set(_mentioned_axes(inner_spec(s, island_axis)))
        groups.setdefault(tuple(a for a in inner_axes if a not in used and mesh.shape[a] > 1), []).append(k)

    def island_mean_codes(codes, scales):
        """Codes and scales of the mean over islands of v [n * C] (given packed), the same bytes on every island."""
        # Row j after the all_to_all: the chunk this island owns, as island j quantized it.
        codes = jax.lax.all_to_all(codes.reshape(n, -1), island_axis, 0, 0, tiled=True)
        scales = jax.lax.all_to_all(scales.reshape(n, -1), island_axis, 0, 0, tiled=True)
        decoded = jax.vmap(codec.unpack)(codes, scales)
        mine = jnp.sum(decoded, axis=0) * jnp.float32(1.0 / n)
        codes, scales = codec.pack(mine)  # re-quantized once, by its owner
        return (jax.lax.all_gather(codes, island_axis, axis=0, tiled=True),
                jax.lax.all_gather(scales, island_axis, axis=0, tiled=True))

    def local_mean_packed(tree):
        leaves, treedef = jax.tree.flatten(tree)
        local = [x[0] for x in leaves]  # local shards, island dim (size 1 here) dropped
        # Each leaf starts on a block boundary, so no scale is shared by two leaves: a small leaf (a norm) keeps its
        # own resolution next to a large one.
        padded = [quant.padded_size(x.size, block_size) for x in local]
        plan: dict[tuple[str, ...], list[int]] = {}
        for rep_axes, members in groups.items():
            # Split only where it saves bytes: each part is padded to n whole blocks, too much for tiny groups.
            r = int(np.prod([mesh.shape[a] for a in rep_axes]))
            length = sum(padded[k] for k in members)
            split = quant.padded_size(length, block_size, n * r) // r < quant.padded_size(length, block_size, n)
            plan.setdefault(rep_axes if split else (), []).extend(members)
        out = [None] * len(leaves)
        sent = [None] * len(leaves)
        for rep_axes, members in plan.items():
            members = sorted(members)  # tree-flatten order
            starts = np.cumsum([0] + [padded[k] for k in members])
            v = jnp.concatenate([jnp.pad(local[k].astype(jnp.float32).reshape(-1), (0, padded[k] - local[k].size))
                                 for k in members])
            r = int(np.prod([mesh.shape[a] for a in rep_axes]))
            v = jnp.pad(v, (0, quant.padded_size(v.shape[0], block_size, n * r) - v.shape[0]))
            part = lambda a: a if r == 1 else jax.lax.dynamic_slice_in_dim(  # noqa: E731 - this replica's share
                a, jax.lax.axis_index(rep_axes) * (a.shape[0] // r), a.shape[0] // r)
            if return_sent:
                # Packed whole, so every replica knows what its island sent; a part is a whole number of blocks
                # (and bytes), so the sliced codes are exactly the part's codes.
                codes, scales = codec.pack(v)
                own = codec.unpack(codes, scales)
                for j, k in enumerate(members):
                    sent[k] = own[starts[j]:starts[j] + local[k].size].reshape((1,) + local[k].shape)
                codes, scales = part(codes), part(scales)
            else:
                codes, scales = codec.pack(part(v))
            codes, scales = island_mean_codes(codes, scales)
            if r > 1:
                codes = jax.lax.all_gather(codes, rep_axes, axis=0, tiled=True)
                scales = jax.lax.all_gather(scales, rep_axes, axis=0, tiled=True)
            mean = codec.unpack(codes, scales)
            for j, k in enumerate(members):
                out[k] = mean[starts[j]:starts[j] + local[k].size].reshape(local[k].shape).astype(local[k].dtype)
        mean = jax.tree.unflatten(treedef, out)
        return (mean, jax.tree.unflatten(treedef, sent)) if return_sent else mean

    if return_sent:
        out_specs = (out_specs, specs)
    if codec.exact:
        return jax.shard_map(local_mean_exact, mesh=mesh, in_specs=(specs,), out_specs=out_specs)
    # check_vma=False: the type system cannot see that every island (and every replica) decodes the same gathered
    # bytes, so it would reject out_specs that are replicated over those axes. Replication holds by construction
    # (and is tested bit for bit).
    return jax.shard_map(local_mean_packed, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)


def reference_island_mean(tree, *, compression: str = "int8", block_size: int = 256, return_sent: bool = False):
    """`make_island_mean`'s arithmetic on one device: islands are the leading dim of every leaf, no mesh, no
    collectives, so a benchmark can run many islands vmapped on one device (benchmarks/quality.py). Its sum is
    sequential in island order with every decoded value rounded first (equal bit for bit to the numpy model in
    tests/test_error_feedback.py); the collective's compiled sum may fuse differently (XLA may contract the decoding
    multiply into the additions), so the two agree to about one float32 ulp of the mean's scale (tested), not bitwise.

    Each island's leaves are raveled, zero-padded to whole blocks and concatenated (tree-flatten order); every island
    packs its vector, the decoded vectors are summed over islands in island order and scaled by 1/n, and the mean is
    packed once and decoded. ``return_sent``: also ``sent`` (each island's own codes, decoded), like the input.
    """
    codec = make_codec(compression, block_size)
    leaves, treedef = jax.tree.flatten(tree)
    n = leaves[0].shape[0]
    if codec.exact:
        mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
        return (mean, jax.tree.map(lambda x: x.astype(jnp.float32), tree)) if return_sent else mean
    sizes = [int(np.prod(x.shape[1:])) for x in leaves]
    padded = [quant.padded_size(k, block_size) for k in sizes]
    starts = np.cumsum([0] + padded)
    v = jnp.concatenate([jnp.pad(x.astype(jnp.float32).reshape(n, -1), ((0, 0), (0, p - k)))
                         for x, k, p in zip(leaves, sizes, padded)], axis=1)
    # quant.pack (XLA's route on every backend) as before; Codec.pack (quant.pack_padded) gives the same bytes.
    roundtrip = lambda u: codec.unpack(*quant.pack(u, bits=codec.bits, block_size=block_size))  # noqa: E731
    sent = jax.lax.optimization_barrier(jax.vmap(roundtrip)(v))  # no FMA into the sum, as in make_island_mean
    mean = roundtrip(jnp.sum(sent, axis=0) * jnp.float32(1.0 / n))

    def split(vec, lead):
        return jax.tree.unflatten(treedef, [vec[..., starts[j]:starts[j] + k].reshape(lead + x.shape[1:]).astype(
            jnp.float32 if lead else x.dtype) for j, (x, k) in enumerate(zip(leaves, sizes))])

    return (split(mean, ()), split(sent, (n,))) if return_sent else split(mean, ())


def _mentioned_axes(spec: P) -> tuple[str, ...]:
    axes: list[str] = []
    for entry in spec:
        if entry is not None:
            axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(axes)


# --------------------------------------------------------------------------------------------------------------------
# Bytes on the wire (for metrics)


def wire_bytes_per_island(num_params: int, n_islands: int, compression: str = "int8", block_size: int = 256) -> int:
    """Bytes each island sends per outer step with `make_island_mean`.

    int8/int4: the payload (codes + scales, padded to n_islands whole-block chunks) is split in n chunks; the
    all_to_all sends n-1 of them and the all_gather sends the owned chunk to n-1 peers: 2 (n-1)/n x payload.
    Counts each parameter once (replicas split their work); per-leaf block padding is not included.
    none: the float32 ring all-reduce, `ring_allreduce_bytes_per_island`.
    """
    codec = make_codec(compression, block_size)
    if codec.exact:
        return ring_allreduce_bytes_per_island(num_params, n_islands, codec.wire_bytes(1))
    n_pad = quant.padded_size(num_params, block_size, n_islands)
    return 2 * (n_islands - 1) * codec.wire_bytes(n_pad // n_islands)


def ring_allreduce_bytes_per_island(num_params: int, n_islands: int, bytes_per_element: int = 4) -> int:
    """Data-parallel ring all-reduce (reduce-scatter + all-gather): 2 (n-1)/n x bytes_per_element x params."""
    return 2 * (n_islands - 1) * -(-num_params // n_islands) * bytes_per_element


# --------------------------------------------------------------------------------------------------------------------
# HLO inspection: which collectives a compiled program runs, with dtype, size and device groups.

_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")


def _parse_groups(line: str) -> tuple[tuple[int, ...], ...] | None:
    m = _GROUPS_IOTA.search(line)
    if m:
        shape = [int(t) for t in m.group(1).split(",")]
        dims = [int(t) for t in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(t) for t in m.group(3).split(",")])
        return tuple(tuple(int(i) for i in g) for g in ids.reshape(shape))
    m = _GROUPS_LIST.search(line)
    if m:
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([0-9,]*)\}", m.group(1)))
    return None


def hlo_collectives(hlo_text: str) -> list[dict]:
    """Collectives in HLO text (e.g. ``jax.jit(f).lower(x).compile().as_text()``).

    Each is a dict: op ("all-gather", ...), arrays ((dtype, elements) per result array), dtypes (element types of
    its result, e.g. ("s8",)), elements (total result elements), groups (device-id groups from replica_groups, None
    when absent), line (the HLO line).
    Async pairs count once (the ``-start`` op; ``-done`` is skipped).
    """
    found = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        result_type = m.group(1)
        arrays = _ARRAY.findall(result_type)
        if m.group(3) and len(arrays) > 1:  # async start: result is (operand, output[, ...]) tuple; keep the output
            arrays = arrays[len(arrays) // 2:]
        sized = tuple((dt, int(np.prod([int(d) for d in dims.split(",") if d]))) for dt, dims in arrays)
        found.append({
            "op": m.group(2),
            "arrays": sized,
            "dtypes": tuple(sorted({dt for dt, _ in sized})),
            "elements": sum(k for _, k in sized),
            "groups": _parse_groups(line),
            "line": line.strip(),
        })
    return found


def axis_groups(mesh, axis: str) -> frozenset[frozenset[int]]:
    """Device-id groups that vary only along ``axis`` (what a collective over that axis lists in replica_groups).

    Ids are positions in ``mesh.devices.flat``, the logical ids XLA's SPMD partitioner uses.
    """
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    k = mesh.axis_names.index(axis)
    moved = np.moveaxis(ids, k, -1).reshape(-1, mesh.shape[axis])
    return frozenset(frozenset(int(i) for i in g) for g in moved)


def island_traffic(hlo_text: str, mesh, island_axis: str = ISLAND) -> dict[tuple[str, str], int]:
    """Per-device result elements of the collectives in ``hlo_text``, keyed (op, dtype).

    Collectives whose device groups are exactly the island-axis groups of ``mesh`` are keyed by their op name;
    any other collective is keyed ("other:" + op, dtype), so a test can assert there is none.
    """
    island = axis_groups(mesh, island_axis)
    everyone = frozenset([frozenset(range(mesh.devices.size))])
    traffic: dict[tuple[str, str], int] = {}
    for c in hlo_collectives(hlo_text):
        groups = frozenset(frozenset(g) for g in c["groups"]) if c["groups"] else everyone
        op = c["op"] if groups == island else "other:" + c["op"]
        for dt, k in c["arrays"]:
            traffic[(op, dt)] = traffic.get((op, dt), 0) + k
    return traffic
