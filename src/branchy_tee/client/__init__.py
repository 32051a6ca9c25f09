"""The data owner's side: request and result files (``envelopes``) and the online ``Client``."""

from branchy_tee.client.online import Client

__all__ = ["Client"]
