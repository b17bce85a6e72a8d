"""`intellect-jax` command line: thin wrappers that parse arguments and call one function each.

    intellect-jax info --config FILE [--section.key=value ...]
    intellect-jax config --config FILE [--section.key=value ...]     the resolved config, as TOML
    intellect-jax train --config FILE [--section.key=value ...]
    intellect-jax prepare-data --input GLOB ... --out DIR
    intellect-jax generate --run-dir DIR --prompt TEXT [--max-new-tokens N --temperature T --top-p P --step S]
    intellect-jax coordinator --bind HOST:PORT --key-file KEY --islands-file FILE [--config FILE] [--elastic.k=v ...]
    intellect-jax keygen --out FILE                                    an island's (or the coordinator's) key pair
    intellect-jax status --coordinator HOST:PORT [--json]             an elastic run's state (the coordinator's --http)

jax is imported only after the config is read, so ``run.host_devices`` / ``run.platform`` can configure it.
A problem the user can fix (a config, checkpoint, data, Hugging Face or missing-file error) ends the command with
one line and exit code 2; ``--debug`` (anywhere on the line) or ``INTELLECT_JAX_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing

from intellect_jax.config import Config, ConfigError, DilocoConfig, ElasticConfig, load_config

# The error classes whose message is the whole story (it names the problem and the fix), by module. A module that
# was never imported cannot have raised its error, so they are looked up only when one is being handled: importing
# checkpoint.py would import jax before the config is read.
USER_ERRORS = {"intellect_jax.config": "ConfigError", "intellect_jax.checkpoint": "CheckpointError",
               "intellect_jax.hf": "HFError", "intellect_jax.shards": "DataError",
               "intellect_jax.tokenizer": "TokenizerError", "intellect_jax.plot": "PlotError",
               "intellect_jax.elastic.identity": "IdentityError", "intellect_jax.elastic.client": "NotAdmitted",
               "intellect_jax.elastic.status": "StatusError"}


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


def cmd_config(args, overrides) -> int:
    cfg = _load(args, overrides)
    given = " ".join([*(["--config", args.config] if args.config else []), *overrides])
    print(f"# intellect-jax config {given}".rstrip())
    print(to_toml(cfg.to_dict()), end="")
    return 0


def to_toml(sections: dict) -> str:
    """A resolved config as TOML that ``--config`` reads back. Hand-written (no TOML writer among the dependencies):
    a config holds only scalars, arrays of scalars and arrays of tables (``[[data.sources]]``)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        arrays = {k: v for k, v in table.items() if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in arrays]
        for key, rows in arrays.items():
            for row in rows:
                lines += ["", f"[[{name}.{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in row.items())]
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # Python's float repr (1e-05, inf, nan) is valid TOML
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid in a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def sections_help() -> str:
    """The config sections and their keys, for `--help`."""
    lines = ["config sections and keys (override any with --section.key=value):"]
    for name, section in typing.get_type_hints(Config).items():
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        lines.append(textwrap.fill(keys, width=110, initial_indent=f"  {name:<11} ", subsequent_indent=" " * 14))
    lines.append("`intellect-jax config --config FILE [--section.key=value ...]` prints every key with its resolved "
                 "value (as TOML, usable as a --config file).")
    return "\n".join(lines)


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
    import shutil

    from intellect_jax import hf

    cfg = _load(args, [*overrides, f"--run.init_from_hf={json_string(args.hf_dir)}"])
    hf_model = hf.read_hf_config(args.hf_dir, base=cfg.model)  # a bad directory fails before anything is created
    if args.model_from_hf:
        cfg = cfg.replace(model=hf_model)
    configure_jax_platform(cfg)
    from intellect_jax.trainer import init_run_from_hf

    fresh = not cfg.run.resolved_dir.expanduser().exists()
    try:
        init_run_from_hf(cfg)
    except BaseException:
        if fresh:  # no half-made run directory: the same command works once the problem is fixed
            shutil.rmtree(cfg.run.resolved_dir.expanduser(), ignore_errors=True)
        raise
    print(f"imported {args.hf_dir} into {cfg.run.resolved_dir}; continue pre-training with: intellect-jax train "
          f"--config {args.config} --run.dir={cfg.run.resolved_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intellect-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: INTELLECT_JAX_DEBUG=1); accepted anywhere")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, FLOPs per token, per-device memory (allocates nothing)")
    _config_args(p)
    p.add_argument("--devices", type=int, default=0,
                   help="devices per island program to size the mesh for (default: the devices jax finds)")
    p.set_defaults(func=cmd_info, takes_overrides=True)
    p = sub.add_parser("config", help="print the resolved config (preset + overrides + defaults) as TOML",
                       epilog=sections_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(p)
    p.set_defaults(func=cmd_config, takes_overrides=True)
    p = sub.add_parser("train", help="train (DiLoCo across the mesh's islands when mesh.islands > 1)",
                       description="Train, resuming from the run directory's latest checkpoint if it has one.",
                       epilog=sections_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
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

    from intellect_jax import generate

    generate.add_parser(sub)  # intellect-jax generate --run-dir D --prompt TEXT [...]
    p = sub.add_parser("plot", help="PNG plots of a run's metrics (loss, throughput, sync time, utilization)")
    plot.add_arguments(p)
    p.set_defaults(func=lambda a, _: plot.run(a), takes_overrides=False)

    p = sub.add_parser("coordinator", help="membership/epoch coordinator for islands joined over TCP")
    coordinator_arguments(p)
    p.set_defaults(func=cmd_coordinator, takes_overrides=True)
    p = sub.add_parser("status", help="the state of an elastic run, from its coordinator's --http endpoint")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="where the coordinator serves --http")
    p.add_argument("--token-file", default="", help="the token its --http-token-file holds (mode 0600)")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.set_defaults(func=cmd_status, takes_overrides=False)
    p = sub.add_parser("keygen", help="write a new Ed25519 key pair for an elastic island or the coordinator (the "
                                      "private key, mode 0600) and print the public key's islands-file line")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="private key file to create (refused if it exists); keep it on this machine")
    g.add_argument("--show", help="print the islands-file line of an existing private key")
    p.add_argument("--name", default="NAME", help="the name to print in the islands-file line (the operator decides "
                                                  "the name it is admitted under)")
    p.set_defaults(func=cmd_keygen, takes_overrides=False)
    p = sub.add_parser("secret", help="write a new shared secret for elastic islands in a local test or demo (32 "
                                      "random bytes, mode 0600); on the internet use keygen")
    p.add_argument("--out", required=True, help="file to create (refused if it exists); copy it to every island")
    p.set_defaults(func=cmd_secret, takes_overrides=False)
    return parser


# -- intellect-jax coordinator ---------------------------------------------------------------------------------------
# `intellect-jax coordinator --bind HOST:PORT --key-file KEY --islands-file FILE [--config FILE]
# [--elastic.key=value ...]` (or --secret-file FILE for a local test or demo). Settings come from the config
# (ElasticConfig's defaults, or the islands' preset with --config); the flags below override single fields.

COORDINATOR_FLAGS = {  # ElasticConfig field -> help
    "dead_after_s": "no heartbeat for this long: the island is dead",
    "min_islands": "islands that must be ready before the first outer step of a fresh run",
    "max_islands": "most islands the coordinator keeps in its table",
    "coordinator_max_frame_bytes": "largest control frame accepted from an island",
    "recovery_grace_s": "after a restart, longest wait for the newest epoch's members to re-register "
                        "(0: dead_after_s)",
    "sync_timeout_s": "an outer step goes on without an island not ready this long after the first one",
    "vote_timeout_s": "a hash vote is decided without the members that have not voted this long after the commit",
    "quarantine_s": "first quarantine of an island that misbehaved repeatedly (doubling each time, at most 1 h)",
    "quarantine_after": "strikes in a row (missed deadlines, lost votes, failed reduces) before a quarantine",
    "streams": "TCP streams per ring link that every island uses (0: automatic, from the measured round trips)",
    "link_mbit": "access-link rate (Mbit/s) the automatic stream count plans for",
    "min_link_mbit": "slowest rate (Mbit/s) a ring link may move at before its reduce is aborted",
}


def coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML preset, e.g. the islands' (its elastic.* and run.name apply)")
    parser.add_argument("--bind", required=True, help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--key-file", help="the coordinator's private key (`intellect-jax keygen`), listed as "
                                           "'coordinator' in the islands file (default: elastic.key_file)")
    parser.add_argument("--islands-file", help="the admitted islands, one `NAME ssh-ed25519 KEY` line each; re-read "
                                               "while the run goes on (default: elastic.islands_file)")
    parser.add_argument("--secret-file", help="shared-secret mode for local tests and demos, instead of keys: the "
                                              "same file as every island's (default: elastic.secret_file)")
    parser.add_argument("--run-id", help="frames from another run are refused (default: elastic.run_id, else "
                                         "run.name, as on the islands)")
    parser.add_argument("--http", help="serve /metrics (Prometheus), /status.json and a status page here, e.g. "
                                       "127.0.0.1:9400 (default: elastic.http, off)")
    parser.add_argument("--http-token-file", help="a token (file of mode 0600) required by --http; needed on any "
                                                  "address but loopback (default: elastic.http_token_file)")
    defaults = ElasticConfig()
    for name, text in COORDINATOR_FLAGS.items():
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value),
                            help=f"{text} (default: elastic.{name}, {value} unless the config says otherwise)")
    parser.add_argument("--max-norm-ratio", type=float,
                        help="leave an island out of an outer step if its pseudo-gradient norm exceeds this x the "
                             "median (default: diloco.max_norm_ratio, %g unless the config says otherwise; 0: only "
                             "non-finite ones)" % DilocoConfig.max_norm_ratio)
    parser.add_argument("--port-file", default="", help="write the bound port here once listening")
    parser.add_argument("--log-level", default="INFO")


def coordinator_config(args: argparse.Namespace, overrides: list[str]) -> tuple[ElasticConfig, str, float]:
    """The coordinator's ElasticConfig (the config with the flags given), run id and max_norm_ratio; raises
    ConfigError."""
    cfg = load_config(args.config, overrides)
    given = {name: getattr(args, name) for name in ("secret_file", "key_file", "islands_file", "http",
                                                      "http_token_file", *COORDINATOR_FLAGS)
             if getattr(args, name) is not None}
    diloco = {"max_norm_ratio": args.max_norm_ratio} if args.max_norm_ratio is not None else {}
    if given.get("secret_file"):  # a flag chooses the mode over the config's
        given.update(key_file="", islands_file="")
    elif given.get("key_file") or given.get("islands_file"):
        given.update(secret_file="")
    try:
        elastic = dataclasses.replace(cfg.elastic, **given)
        elastic.validate()
    except ConfigError as e:
        raise ConfigError(f"coordinator: {e}") from None
    cfg = cfg.replace(elastic=elastic, diloco=dataclasses.replace(cfg.diloco, **diloco))
    e = cfg.elastic
    if not e.secret_file and not (e.key_file and e.islands_file):
        raise ConfigError("the coordinator needs its key and the islands file: pass --key-file and --islands-file "
                          "(make the key with `intellect-jax keygen --out coordinator.key`; see the README's "
                          "'Elastic islands' section), or --secret-file for a local test")
    return cfg.elastic, args.run_id or cfg.elastic.run_id or cfg.run.name, cfg.diloco.max_norm_ratio


def cmd_coordinator(args: argparse.Namespace, overrides: list[str]) -> int:
    import logging
    import signal
    import threading

    from intellect_jax.elastic import identity
    from intellect_jax.elastic.coordinator import Coordinator, coordinator_auth

    cfg, run_id, max_norm_ratio = coordinator_config(args, overrides)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)  # absl may own root
    try:
        coord = Coordinator(cfg, run_id, args.bind, coordinator_auth(cfg), max_norm_ratio).start()
    except (ValueError, OSError) as e:
        if isinstance(e, identity.IdentityError):
            raise
        raise ConfigError(f"coordinator: {e}") from None
    if args.port_file:
        from pathlib import Path
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(coord.port))
        tmp.replace(args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    coord.close()
    return 0


def cmd_status(args: argparse.Namespace, overrides: list[str]) -> int:
    from intellect_jax.elastic import identity, status

    token = identity.read_private(args.token_file, "token file", "pass the coordinator's --http-token-file").decode() \
        .strip() if args.token_file else None
    doc = status.fetch(args.coordinator, token)
    print(json.dumps(doc, indent=1) if args.json else status.format_table(doc))
    return 0


def cmd_keygen(args: argparse.Namespace, overrides: list[str]) -> int:
    from intellect_jax.elastic import identity

    if args.show:
        print(f"{args.name} {identity.public_text(identity.load_key(args.show))}")
        return 0
    line = identity.write_key(args.out)
    print(f"{args.name} {line}")
    print(f"# wrote the private key to {args.out} (mode 0600; it never leaves this machine). Send the line above to "
          "the run's operator, who adds it to the islands file (the coordinator's own key goes there under the name "
          f"'{identity.COORDINATOR}').", file=sys.stderr)
    return 0


def cmd_secret(args: argparse.Namespace, overrides: list[str]) -> int:
    from intellect_jax.elastic import identity

    path = identity.write_secret(args.out)
    print(f"wrote {identity.SECRET_BYTES} random bytes to {path} (mode 0600); copy it to every island and the "
          "coordinator over a channel you trust (e.g. scp), and keep its mode 0600. Anyone holding it can be any "
          "island: for islands run by different people, give each its own key (`intellect-jax keygen`)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("INTELLECT_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--") and "=" in r]
    unknown = [r for r in rest if r not in overrides]
    if unknown or (overrides and not args.takes_overrides):
        bad = unknown[0] if unknown else overrides[0]
        parser.error(f"unrecognized argument {bad!r}; config overrides are written --section.key=value")
    try:
        return args.func(args, overrides) or 0
    except (FileNotFoundError, *_user_errors()) as e:
        if debug:
            raise
        what = "config error" if isinstance(e, ConfigError) else "error"
        print(f"intellect-jax {args.command}: {what}: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
