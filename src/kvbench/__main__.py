import sys

from . import warm

if warm.enabled():  # a local Snakemake job: run in a child forked from a warm server (see kvbench.warm)
    code = warm.run(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)

from .cli import main  # noqa: E402

main()
