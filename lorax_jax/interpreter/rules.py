"""The built-in rule groups: importing this module registers their records (see `base`).

A new group of rules is a module calling `base.register(...)`, listed here.
"""

from lorax_jax.interpreter import conv  # noqa: F401
from lorax_jax.interpreter import dot_general  # noqa: F401
from lorax_jax.interpreter import gather  # noqa: F401
from lorax_jax.interpreter import higher_order  # noqa: F401
from lorax_jax.interpreter import moves  # noqa: F401
