"""`python -m dgrun_xdit`: the recipe entry equivalent to the DG_XDIT_* variables of a launcher script.

dgrun reads parallel settings from the recipe only (the recipe is the record of a run), so a team moving
from `export DG_XDIT_ULYSSES_DEGREE=4` scripts pastes this line into `optimize:` instead.
"""

from __future__ import annotations

import os
import sys

from dgrun.errors import UsageError
from dgrun_xdit import ENV_PREFIX, XditParams, params_from_environment, recipe_entry


def main() -> int:
    set_vars = sorted(key for key in os.environ if key.startswith(ENV_PREFIX))
    if not set_vars:
        print(f"no {ENV_PREFIX}* variables are set; e.g. {ENV_PREFIX}ULYSSES_DEGREE=4", file=sys.stderr)
        return 2
    try:
        entry = recipe_entry()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = XditParams(**params_from_environment())
    print(f"# from {', '.join(f'{key}={os.environ[key]}' for key in set_vars)}")
    print("optimize:")
    print(f"  {entry}")
    print(f"# launch: torchrun --nproc_per_node {params.world_size} -m dgrun RECIPE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
