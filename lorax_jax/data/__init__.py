"""Offline datasets: real data that ships inside installed packages, nothing downloaded."""

from lorax_jax.data.digits import digits

__all__ = ['digits']
