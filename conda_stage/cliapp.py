"""The full ``conda-stage`` command line, on plumbum: options, help,
subcommands.  Imported only when needed -- plumbum's import alone takes
~0.1 s, more than the rest of an activation's staging outside extraction --
so the two calls the activation hooks make are parsed in :mod:`cli`
without it; everything else comes here.
"""
from __future__ import annotations

from pathlib import Path

from plumbum import cli
from plumbum.cli.application import (ShowCompletion, ShowHelp, ShowHelpAll,
                                     ShowVersion, SwitchError)

from . import __version__, output
from .cli import describe_os_error, pack_action, stage_action, unstage_action
from .errors import StageError, UsageError
from .formats import FORMATS
from .resolve import resolve

_ACTIONS = ("--auto-stage", "--pack", "--stage", "--unstage")


class _UserOSError(StageError):
    """An OSError on the way, e.g. on a file of someone else's environment."""

    def __init__(self, exc: OSError):
        super().__init__(describe_os_error(exc))


class _App(cli.Application):
    """Report usage errors as one ``ERROR:`` line instead of plumbum's
    message plus the whole help text."""

    def _parse_args(self, argv):
        try:
            return super()._parse_args(argv)
        except (ShowHelp, ShowHelpAll, ShowVersion, ShowCompletion):
            raise
        except SwitchError as exc:
            raise UsageError(f"{exc} (see 'conda-stage --help')") from None

    def _parse_and_dispatch(self, argv):
        # plumbum's run() swallows an OSError with errno EINVAL (meant for a
        # closed stdout on Windows) and exits 1 without a word: report
        # OSErrors from the work done here ourselves.
        try:
            return super()._parse_and_dispatch(argv)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _UserOSError(exc) from exc

    def _validate_args(self, swfuncs, tailargs):
        try:
            return super()._validate_args(swfuncs, tailargs)
        except (ShowHelp, ShowHelpAll, ShowVersion, ShowCompletion):
            raise
        except SwitchError as exc:
            raise UsageError(f"{exc} (see 'conda-stage --help')") from None


class CondaStage(_App):
    """Stage Conda environments onto local disk, so that Python and friends
    start from fast local storage instead of a slow shared filesystem.

    Enable once with --auto-stage=enable NAME; from then on 'conda activate
    NAME' stages the environment (from a tarball packed next to it, rebuilt
    when the environment changes) and 'conda deactivate' removes the copy.
    Skip staging for one activation with: CONDA_STAGE=false conda activate NAME

    ENV is an environment name or path (default: the active environment).
    """

    PROGNAME = "conda-stage"
    VERSION = __version__
    USAGE = ("    conda-stage --auto-stage=enable [--image] | --auto-stage=disable [ENV]\n"
             "    conda-stage --pack [--force] [--format tar.zst|tar.gz] [--image] [ENV]\n"
             "    conda-stage --stage [--writable] [--path DIR] [ENV]\n"
             "    conda-stage --unstage [--force] [--background] [STAGED_PREFIX]\n"
             "    conda-stage status [ENV] | --node [--json]\n"
             "    conda-stage gc [--dry-run] [--jobs [--all-unused]]\n")

    auto_stage = cli.SwitchAttr(
        "--auto-stage", cli.Set("enable", "disable"), group="Actions",
        help="Enable: install activate/deactivate hooks in the environment and pack it "
             "once. Disable: remove the hooks, the tarball and the image")
    do_pack = cli.Flag("--pack", group="Actions",
                       help="Pack the environment into its tarball (if it is not fresh)")
    do_stage = cli.Flag("--stage", group="Actions",
                        help="Stage the environment to local disk and print the staged path")
    do_unstage = cli.Flag("--unstage", group="Actions",
                          help="Let go of a staged copy (default: the active one) and remove "
                               "it, unless other shells still use it")

    force = cli.Flag("--force", help="With --pack: repack even if the tarball is fresh; with "
                                     "--unstage: remove the copy even if other shells use it")
    fmt = cli.SwitchAttr("--format", cli.Set(*FORMATS), default=None,
                         help="Archive format for packing (default tar.zst)")
    writable = cli.Flag("--writable", help="Leave the staged copy writable "
                        "(default: read-only; changes are lost when unstaged anyway)")
    path = cli.SwitchAttr("--path", str, default=None, argname="DIR",
                          help="With --stage: stage into exactly DIR, which must not exist "
                               "(default: a new conda-stage-XXXXXXXX folder in $TMPDIR)")
    image = cli.Flag("--image",
                     help="With --pack or --auto-stage=enable: also build the squashfs image "
                          "that scheduler hooks mount instead of extracting "
                          "(CONDA_STAGE_STAGE_MODE=auto|image; needs mksquashfs) -- and "
                          "'conda activate' too where the site file says "
                          "CONDA_STAGE_SHELL_IMAGES=yes. An "
                          "environment that has an image gets it rebuilt whenever it is "
                          "repacked")
    ignore_missing = cli.Flag("--ignore-missing-files",
                              help="Pack even if files conda installed were deleted")
    owner_pid = cli.SwitchAttr("--owner-pid", int, default=None, argname="PID",
                               help="With --stage: the shell that holds the copy ('conda-stage "
                                    "gc' removes it once every holding shell is gone); with "
                                    "--unstage: the shell that lets go (default: the caller)")
    background = cli.Flag("--background", requires=["--unstage"],
                          help="With --unstage: return at once and remove the copy in a "
                               "detached process (what 'conda deactivate' does); a copy it "
                               "could not finish is left for 'conda-stage gc'")
    quiet = cli.Flag(["-q", "--quiet"], help="Only warnings and errors")
    debug = cli.Flag("--debug", help="Print debug messages")

    def main(self, env=None):
        output.configure(quiet=self.quiet, debug=self.debug)
        if self.nested_command:
            return 0
        chosen = [name for name, on in zip(_ACTIONS, (self.auto_stage, self.do_pack,
                                                       self.do_stage, self.do_unstage)) if on]
        if not chosen:
            if env is None:
                self.help()
                return 0
            raise UsageError("No action given: use one of --auto-stage, --pack, --stage, "
                             "--unstage (see 'conda-stage --help')")
        if len(chosen) > 1:
            raise UsageError(f"Choose one action, not {' and '.join(chosen)}")
        if self.image and not (self.do_pack or self.auto_stage == "enable"):
            raise UsageError("--image goes with --pack or --auto-stage=enable "
                             "(see 'conda-stage --help')")
        if self.auto_stage:
            return self._auto_stage(env)
        if self.do_pack:
            return pack_action(env, fmt=self.fmt, force=self.force,
                               ignore_missing_files=self.ignore_missing, image=self.image)
        if self.do_stage:
            return self._stage(env)
        return self._unstage(env)

    def _auto_stage(self, env):
        from . import autostage

        target = resolve(env)
        if self.auto_stage == "enable":
            autostage.enable(target, quiet=self.quiet, writable=self.writable, fmt=self.fmt,
                             image=self.image)
        else:
            autostage.disable(target)
        return 0

    def _stage(self, env):
        return stage_action(env, path=self.path, owner_pid=self.owner_pid,
                            writable=self.writable)

    def _unstage(self, env):
        return unstage_action(env, force=self.force, owner_pid=self.owner_pid,
                              background=self.background)


@CondaStage.subcommand("status")
class Status(_App):
    """Show whether auto-staging is enabled, the tarball (size, age, fresh or
    stale) and the staged copies of an environment.  With --node: the copies
    on this node shared by jobs, who holds them, their size and age (root
    sees every user's, a user their own)."""

    node = cli.Flag("--node", help="The copies on this node's staging folder")
    as_json = cli.Flag("--json", help="With --node: one JSON document")

    def main(self, env=None):
        from .status import node_status, status_lines

        if self.node or self.as_json:
            print(node_status(as_json=self.as_json))
            return 0
        for line in status_lines(resolve(env)):
            print(line)
        return 0


@CondaStage.subcommand("gc")
class Gc(_App):
    """Remove staged copies (in $TMPDIR or /tmp) whose shell has exited without
    'conda deactivate'.  With --jobs (as root; from a timer or cron): remove
    job folders of jobs the scheduler no longer runs (e.g. the node crashed
    before the epilog), drop such jobs from the shared copies they held, and
    remove shared copies nobody holds once past their keep time."""

    dry_run = cli.Flag("--dry-run", help="Only list what would be removed")
    jobs = cli.Flag("--jobs", help="Collect job folders and shared copies in the staging "
                                   "folder of /etc/default/conda-stage (as root)")
    all_unused = cli.Flag("--all-unused", requires=["--jobs"],
                          help="Also remove shared copies nobody holds that are still "
                               "within their keep time (CONDA_STAGE_KEEP_UNUSED)")

    def main(self):
        from .gc import collect, collect_jobs
        from .store import staging_base

        if self.jobs:
            from .config import Config
            from .job import node_is_running

            config = Config.load()
            collect_jobs(Path(config.staging_dir), Path(config.state_dir),
                         node_is_running(config), dry_run=self.dry_run,
                         keep=0.0 if self.all_unused else config.keep_unused,
                         keep_share=config.keep_share, shell_images=config.shell_images)
        else:
            collect(staging_base(), dry_run=self.dry_run)
        return 0


@CondaStage.subcommand("doctor")
class Doctor(_App):
    """Check this node's setup for the scheduler hooks (as root): the site
    file, the installation, the staging and state folders, free space, the
    Slurm/SGE hook configuration, FUSE.  Prints one line per check and exits
    1 if the hooks would refuse something or a user could take it over."""

    def main(self):
        from .doctor import main as doctor

        return doctor()
