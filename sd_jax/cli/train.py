"""``python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]``.

Exit status: 0 done; 2 a usage error (bad flag, config key or value, missing file or folder, unwritable
workdir); 1 a runtime error (no checkpoint restores, the step does not fit in memory, a model that does not load);
3 a NaN/inf metric stopped the run (nothing non-finite was saved); 143 SIGTERM and 130 SIGINT (Ctrl-C): the
run saved and stopped, so run the same command to resume. Errors are one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from sd_jax.cli.train_config import UsageError, apply_overrides, describe, load_config, split_overrides

EXIT_USAGE, EXIT_RUNTIME, EXIT_NON_FINITE = 2, 1, 3

EPILOG = """\
config keys: any key of the config, as --config.KEY=VALUE (nested: --config.optim.lr=1e-4; tuples:
  --config.train='("unet","text_encoder")'; under model.unet/model.vae/model.text any architecture field).
  python train.py --config FILE --show-config lists every key with its value.
exit status: 0 done, 2 usage error, 1 runtime error, 3 NaN/inf metric, 143 SIGTERM / 130 SIGINT (saved; rerun to
  resume)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} ; see python train.py --help", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python train.py", description="Train with sd-jax (see configs/ and the README).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", metavar="FILE[:ARG]", help="training config file, e.g. configs/tiny.py")
    p.add_argument("--workdir", help="checkpoints, metrics, samples and exports go here (resumed if it has any)")
    p.add_argument("--show-config", action="store_true", help="print the resolved config (with overrides) and exit")
    p.add_argument("--export", metavar="OUT", help="instead of training: export the latest checkpoint "
                   "(a diffusers folder; LoRA: a .safetensors file)")  # fmt: skip
    p.add_argument("--export_raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (else from the environment)")
    p.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, help="multi-host: this process's index")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _fail(e: BaseException, code: int, debug: bool):
    if debug:
        raise e
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code) from None


def _help(p, args) -> None:
    p.print_help()
    if args.config:
        try:
            print(f"\nkeys of {args.config}:\n" + describe(load_config(args.config)))
        except UsageError as e:
            print(f"\n({e})")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    p = parser()
    wants_help = any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in rest)
    args = p.parse_args([a for a in rest if a not in ("-h", "--help", "--helpfull", "--helpshort")])
    if wants_help:
        _help(p, args)
        return
    try:
        if not args.config:
            raise UsageError("--config FILE is required, e.g. --config configs/tiny.py (see --help)")
        cfg = apply_overrides(load_config(args.config), overrides)
        cfg.lock()
        if args.show_config:
            print(describe(cfg))
            return
        _run(cfg, args)
    except UsageError as e:
        _fail(e, EXIT_USAGE, args.debug)


def _run(cfg, args) -> None:
    from absl import logging

    from sd_jax.errors import SDJaxError
    from sd_jax.training.checks import ConfigError, check_config

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    try:
        if not args.workdir:
            raise ConfigError("--workdir DIR is required (checkpoints, metrics and exports go there)")
        if args.coordinator or args.num_processes:
            import jax

            # CPU processes talk over gloo (only affects the CPU backend; must be set before initialize).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        import jax

        if args.export:
            check_export(cfg, args)
        else:
            check_config(cfg, args.workdir, process_count=jax.process_count())
    except (SDJaxError, ValueError) as e:  # every check here is about the arguments: usage errors
        _fail(e, EXIT_USAGE, args.debug)
    _train_or_export(cfg, args)


def check_export(cfg, args) -> None:
    from sd_jax.loading.export import check_output
    from sd_jax.training.checkpoints import require_checkpoint
    from sd_jax.training.checks import check_workdir

    check_workdir(args.workdir, create=False)
    require_checkpoint(args.workdir)
    lora = cfg.get("trainer", "diffusion") == "lora"
    check_output(args.export, folder=not (lora and args.export.endswith(".safetensors")))


def _train_or_export(cfg, args) -> None:
    from sd_jax.errors import SDJaxError
    from sd_jax.training import loop
    from sd_jax.training.checkpoints import NonFiniteLoss
    from sd_jax.training.checks import ConfigError
    from sd_jax.training.preemption import Preempted

    try:
        if args.export:
            out = loop.export(cfg, args.workdir, args.export, use_ema=not args.export_raw)
            print(f"wrote {out}")
            return
        m = loop.train(cfg, args.workdir)
    except Preempted as e:
        print(str(e).split(": ", 1)[1], flush=True)  # "preempted at step N; saved"
        raise SystemExit(e.exit_code) from None
    except NonFiniteLoss as e:
        _fail(e, EXIT_NON_FINITE, args.debug)
    except ConfigError as e:
        _fail(e, EXIT_USAGE, args.debug)
    except (SDJaxError, OSError) as e:
        _fail(e, EXIT_RUNTIME, args.debug)
    print(f"done: step {m.get('step')} loss {m.get('loss', float('nan')):.4f}")
