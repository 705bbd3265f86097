"""Offline datasets: real data that ships inside installed packages, nothing downloaded."""

from lorax_jax.data import stdlib_text as text
from lorax_jax.data.batches import Batches
from lorax_jax.data.digits import digits
from lorax_jax.data.stdlib_text import Windows, stdlib_text

__all__ = ['Batches', 'Windows', 'digits', 'stdlib_text', 'text']
