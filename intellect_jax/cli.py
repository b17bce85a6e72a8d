"""`intellect-jax` command line: thin wrappers that parse arguments and call one function each.

    intellect-jax info --config FILE [--section.key=value ...]
    intellect-jax train --config FILE [--section.key=value ...]
    intellect-jax prepare-data --input GLOB ... --out DIR
    intellect-jax coordinator --bind HOST:PORT --secret-file FILE [--config FILE] [--elastic.key=value ...]

jax is imported only after the config is read, so ``run.host_devices`` / ``run.platform`` can configure it.
"""

from __future__ import annotations

import argparse
import os
import sys

from intellect_jax.config import Config, ConfigError, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML preset (see configs/); defaults apply when omitted")


def _load(args: argparse.Namespace, overrides: list[str]) -> Config:
    return load_config(args.config, overrides)


def configure_jax_platform(cfg: Config) -> None:
    """Must run before jax initialises a backend: CPU device simulation and platform choice."""
    if cfg.run.host_devices:
        flag = f"--xla_force_host_platform_device_count={cfg.run.host_devices}"
        os.environ["XLA_FLAGS"] = " ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            + [flag])
    if cfg.run.platform:
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda,rocm", "cpu": "cpu", "tpu": "tpu"}[cfg.run.platform]


def cmd_info(args, overrides) -> int:
    cfg = _load(args, overrides)
    from intellect_jax.info import format_info

    devices = args.devices or cfg.run.host_devices or None
    if devices is None:
        configure_jax_platform(cfg)
        import jax

        devices = jax.device_count()
    try:
        sizes = cfg.mesh.resolve(devices)
    except ConfigError as e:
        print(f"note: {e}; showing the estimate for fsdp over {devices} device(s)", file=sys.stderr)
        sizes = {"islands": 1, "data": 1, "fsdp": devices, "tensor": 1}
    print(format_info(cfg, sizes))
    return 0


def cmd_train(args, overrides) -> int:
    cfg = _load(args, overrides)
    configure_jax_platform(cfg)
    from intellect_jax import distributed

    distributed.initialize(distributed.discover())
    from intellect_jax.trainer import train

    summary = train(cfg)
    if summary["first_loss"] is None:
        print(f"nothing to do: the checkpoint in {summary['run_dir']} is already at step {summary['steps']}; "
              "raise --run.steps to train further")
    else:
        stopped = " (stopped by signal; run the same command to resume)" if summary["stopped"] else ""
        print(f"trained to step {summary['steps']}: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
              f"{summary['tokens_per_s']:.0f} tokens/s; run dir {summary['run_dir']}{stopped}")
    return 0


def json_string(text: str) -> str:
    """A TOML basic string (JSON escaping is valid TOML) for an override value."""
    import json

    return json.dumps(text)


def cmd_import_hf(args, overrides) -> int:
    cfg = _load(args, [*overrides, f"--run.init_from_hf={json_string(args.hf_dir)}"])
    configure_jax_platform(cfg)
    if args.model_from_hf:
        import json
        from pathlib import Path

        from intellect_jax import hf

        hf_cfg = json.loads((Path(args.hf_dir) / "config.json").read_text())
        cfg = cfg.replace(model=hf.model_config_from_hf(hf_cfg, base=cfg.model))
    from intellect_jax.trainer import init_run_from_hf

    init_run_from_hf(cfg)
    print(f"imported {args.hf_dir} into {cfg.run.resolved_dir}; continue pre-training with: intellect-jax train "
          f"--config {args.config} --run.dir={cfg.run.resolved_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intellect-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, FLOPs per token, per-device memory (allocates nothing)")
    _config_args(p)
    p.add_argument("--devices", type=int, default=0,
                   help="devices per island program to size the mesh for (default: the devices jax finds)")
    p.set_defaults(func=cmd_info, takes_overrides=True)
    p = sub.add_parser("train", help="train (DiLoCo across the mesh's islands when mesh.islands > 1)")
    _config_args(p)
    p.set_defaults(func=cmd_train, takes_overrides=True)

    from intellect_jax import prepare_data

    p = sub.add_parser("prepare-data", help="tokenize local text/JSONL/Parquet into shards + manifest")
    prepare_data.add_arguments(p)
    p.set_defaults(func=lambda a, _: prepare_data.run(a), takes_overrides=False)

    from intellect_jax import hf, plot

    p = sub.add_parser("export-hf", help="write a checkpoint's global params as a Hugging Face Llama directory")
    hf.add_export_arguments(p)
    p.set_defaults(func=lambda a, _: hf.run_export(a), takes_overrides=False)
    p = sub.add_parser("import-hf", help="start a run directory from a Hugging Face Llama checkpoint")
    _config_args(p)
    p.add_argument("--hf-dir", required=True, help="local Hugging Face directory (config.json + *.safetensors)")
    p.add_argument("--model-from-hf", action="store_true",
                   help="take the model.* architecture keys from the checkpoint's config.json")
    p.set_defaults(func=cmd_import_hf, takes_overrides=True)

    p = sub.add_parser("plot", help="PNG plots of a run's metrics (loss, throughput, sync time, utilization)")
    plot.add_arguments(p)
    p.set_defaults(func=lambda a, _: plot.run(a), takes_overrides=False)

    from intellect_jax.elastic import coordinator

    p = sub.add_parser("coordinator", help="membership/epoch coordinator for islands joined over TCP")
    coordinator.add_arguments(p)
    p.set_defaults(func=coordinator.run, takes_overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--") and "=" in r]
    unknown = [r for r in rest if r not in overrides]
    if unknown or (overrides and not args.takes_overrides):
        bad = unknown[0] if unknown else overrides[0]
        parser.error(f"unrecognized argument {bad!r}; config overrides are written --section.key=value")
    try:
        return args.func(args, overrides) or 0
    except ConfigError as e:
        print(f"intellect-jax: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
