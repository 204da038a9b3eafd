"""The `transferkit` command: thin typer commands over the library; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import atexit
import os
import sys
import threading

import typer

try:  # recent typer vendors click and raises its own copies of click's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from transferkit.errors import UserError

# PyTorch reports a loader process killed by the system (its out-of-memory killer, usually) as a plain RuntimeError.
LOADER_WORKER_DIED = "DataLoader worker"

app = typer.Typer(
    name="transferkit",
    help="Transfer learning for image classification: a folder of images in, a fine-tuned classifier out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


def _register_commands() -> None:
    # Imported here so `transferkit --help` stays fast and each command module only registers itself.
    from transferkit.cli import (  # noqa: F401
        auto,
        backbones,
        config,
        demo,
        doctor,
        export,
        fetch,
        insight,
        pack,
        report,
        serve,
        training,
    )


def config_defaults() -> dict[str, dict]:
    """Per command, the defaults of options left None on the command line so a recipe or config file can fill them."""
    from dataclasses import asdict

    from transferkit.config import TrainConfig
    from transferkit.doctor.options import DoctorOptions

    train = asdict(TrainConfig())
    return {"train": train, "auto": train, "lr-find": train, "doctor": asdict(DoctorOptions())}


def show_config_defaults(group: typer.core.TyperGroup) -> None:
    """`--help` shows every default, also of the None-default options whose value comes from the config."""
    for name, defaults in config_defaults().items():
        for param in group.commands[name].params:
            value = defaults.get(param.name)
            if param.default is None and value not in (None, [], {}) and "default" not in (param.help or ""):
                param.help = f"{param.help or ''}  [default: {value}]"  # as click writes its own, unbracketed


def fail(message: str) -> int:
    print(f"transferkit: error: {message}", file=sys.stderr)
    return 2


# This command's arguments, for a command that starts itself again in several processes (train --num-processes).
INVOCATION: list[str] = []


def run_cli(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (tests call this; the console script wraps it)."""
    INVOCATION[:] = sys.argv[1:] if argv is None else argv
    _register_commands()
    try:
        command = typer.main.get_command(app)
        if "--help" in (sys.argv[1:] if argv is None else argv):
            show_config_defaults(command)
        # Without standalone mode a command's typer.Exit(n) comes back as the return value, not as an exception.
        code = command.main(args=argv, prog_name="transferkit", standalone_mode=False)
    except UserError as exc:
        return fail(str(exc).replace("\n", " "))
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "")
        return 0
    except click_errors.UsageError as exc:
        return fail(exc.format_message().replace("\n", " "))
    except RuntimeError as exc:
        if LOADER_WORKER_DIED not in str(exc):
            raise
        return fail("an image-loading worker process died, most likely killed for lack of memory: try a smaller "
                    "--batch-size or --image-size, or --workers 0")
    except (typer.Abort, KeyboardInterrupt):
        print("transferkit: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


def main() -> None:
    code = run_cli()
    if "torch" in sys.modules:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """Exit as Python does (non-daemon threads joined, atexit handlers and finalizers run, output flushed) but
    without tearing down every module: with torch, timm, scikit-learn and matplotlib loaded that took 1.5-2.7 s
    of a 12-14 s `train` (decision 0261)."""
    threading._shutdown()  # what Python's exit does first: thread pools told to stop, non-daemon threads joined
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
