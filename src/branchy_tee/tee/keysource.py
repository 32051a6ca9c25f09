"""Where the enclave gets its keys. The runtime asks for keys by id and does not care how they come.

``FileKeys`` reads key files (development, and the native backend). The attested source
(``tee.attest.client``) fetches them from the owners' key brokers after remote attestation.
"""

from __future__ import annotations

from typing import Protocol

from branchy_tee.core.errors import IntegrityError
from branchy_tee.core.fileio import read_key_file
from branchy_tee.core.keys import key_id


class KeySource(Protocol):
    def model_key(self, kid: str) -> bytes: ...

    def data_keys(self, kids: list[str]) -> dict[str, bytes]: ...

    def min_model_version(self) -> int: ...

    def plaintext_allowed(self, kid: str) -> bool:
        """May results of requests under data key ``kid`` be written in plain text (its owner consented)?"""
        ...


class FileKeys:
    """Keys from files: one model key, any number of data keys."""

    def __init__(self, model_key_file: str, data_key_files: list[str], min_version: int = 0):
        self._model = read_key_file(model_key_file)
        self._data = {key_id(k): k for k in map(read_key_file, data_key_files)}
        self._min_version = min_version

    def model_key(self, kid: str) -> bytes:
        if key_id(self._model) != kid:
            raise IntegrityError(
                f"the bundle is sealed for model key id {kid}, but the model key given has id {key_id(self._model)}"
            )
        return self._model

    def data_keys(self, kids: list[str]) -> dict[str, bytes]:
        return {k: v for k, v in self._data.items() if k in kids}

    def min_model_version(self) -> int:
        return self._min_version

    def plaintext_allowed(self, kid: str) -> bool:
        return True  # key files: whoever holds them is both owners (development; refused inside an enclave)
