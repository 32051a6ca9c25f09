"""``branchy-tee demo``: every party of a deployment played on this machine (``run``)."""
