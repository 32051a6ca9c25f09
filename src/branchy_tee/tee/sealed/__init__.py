"""The enclave's side of the sealed formats: the bundle opened, verified and decrypted stage by
stage; requests opened and results sealed for their data owners."""
