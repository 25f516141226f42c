"""Training engines: the contrastive step (and, with issue 4, the Ignite engines built on it)."""

from .step import ContrastiveStep

__all__ = ["ContrastiveStep"]
