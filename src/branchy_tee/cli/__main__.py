"""`python -m branchy_tee.cli`: the enclave launcher and tests run the command this way."""

from . import main

raise SystemExit(main())
