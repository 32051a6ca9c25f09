"""``serve``: the enclave answers data owners online, over attested TLS, batching their requests."""
