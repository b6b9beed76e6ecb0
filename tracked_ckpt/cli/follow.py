"""Commands that run other programs: follow (a command per new checkpoint) and demo (the demo training job)."""

from __future__ import annotations

import sys

import click

from .errors import EXIT_CODES_HELP, URI_KEY
from .group import _common, cli

# ----------------------------------------------------------------------------------------------- follow


@cli.command("follow", epilog=EXIT_CODES_HELP)
@click.argument("run")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@click.option("--latest-only", is_flag=True, help="Skip to the newest checkpoint each time (an inference server).")
@click.option("--log-metrics", is_flag=True, help="Log CMD's key=value output lines into the run at the step.")
@click.option("--resume", metavar="KEY", help="Start after the last step at which the run has metric KEY.")
@click.option("--until-step", type=int, help="Stop after the checkpoint of this step (or the first one past it).")
@click.option("--timeout", type=float, help="Stop after this many seconds.")
@click.option("--weights-only", is_flag=True, help="Fetch only the model's weights (model.pt).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Keep fetched files here (default: a temp dir).")
@_common
def follow_cmd(run: str, command: tuple[str, ...], latest_only: bool, log_metrics: bool, resume: str | None,
               until_step: int | None, timeout: float | None, weights_only: bool, cache_dir: str | None,
               tracking_uri: str | None) -> None:  # fmt: skip
    """Run CMD for each new checkpoint of RUN as it is recorded; exit when the run ends.

    CMD gets the checkpoint's verified local folder and step as {path}, {step}, {ref}, {run_id} in its
    arguments and as TRACKED_CKPT_PATH, TRACKED_CKPT_STEP, TRACKED_CKPT_REF, TRACKED_CKPT_RUN_ID. A failing CMD
    stops the follower with its exit status.

    \b
    Examples:
      tracked-ckpt follow RUN_ID --log-metrics --resume eval/accuracy -- python eval.py {path}
      tracked-ckpt follow RUN_ID --latest-only --weights-only -- ./reload-server.sh
    """
    from ..follow_cmd import follow_command

    sys.exit(follow_command(run, command, latest_only=latest_only, log_metrics=log_metrics, resume=resume,
                            until_step=until_step, timeout=timeout, weights_only=weights_only, cache_dir=cache_dir,
                            tracking_uri=tracking_uri))  # fmt: skip


# ------------------------------------------------------------------------------------------------- demo


@cli.command(
    "demo",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def demo_cmd(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the demo training job (REINFORCE cart-pole) in the current folder; `demo --help` for options.

    \b
    Examples:
      tracked-ckpt demo                   # a new run, or resume this folder's run
      tracked-ckpt demo --iterations 10
    """
    from ..demo import main as demo_main

    uri = ctx.meta.get(URI_KEY)
    if uri and not any(a == "--tracking-uri" or a.startswith("--tracking-uri=") for a in args):
        args = ("--tracking-uri", uri, *args)  # given before the command name
    sys.exit(demo_main(list(args), prog="tracked-ckpt demo"))

