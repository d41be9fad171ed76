"""Diptych: disaggregated LLM serving. The user-facing package: the ``diptych`` command and the client SDK.

    from diptych import Client, AsyncClient
"""

from diptych.client import AsyncClient, Client
from diptych.errors import DiptychError

__all__ = ["AsyncClient", "Client", "DiptychError"]
__version__ = "0.1.0"
