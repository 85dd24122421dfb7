"""Launch constants of a kernel module set from an environment variable, for benchmarking only.

``SPARSE_SERVE_<MODULE>="NAME=INT,..."`` (the ``SPARSE_SERVE_`` prefix is left to tooling; it
is not configuration, see :mod:`sparse_kernels.config`) overrides module constants at import,
so that an end-to-end A/B runs two settings of a kernel without a code change, each in its
own engine process. Unknown names raise: a typo must not measure the default by mistake.
"""

from __future__ import annotations

import os


def apply_tooling_env(namespace: dict, env_name: str, tunable: tuple[str, ...],
                      value: str | None) -> dict[str, int]:
    """Set the constants named in ``value`` ("NAME=INT,...", names case-insensitive) in
    ``namespace`` (a module's ``globals()``); returns what was set."""
    got = {}
    for item in filter(None, (value or "").split(",")):
        name, _, num = item.partition("=")
        name = name.strip().upper()
        if name not in tunable:
            raise ValueError(f"{env_name}: unknown constant {name!r} (one of {tunable})")
        got[name] = int(num)
    namespace.update(got)
    return got


def maxnreg_option(maxnreg: int) -> dict[str, int]:
    """A launch's ``maxnreg`` keyword for a register-cap constant (0: no cap); none under
    ``TRITON_INTERPRET``, whose launcher takes no such option."""
    if not maxnreg or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return {}
    return {"maxnreg": maxnreg}
