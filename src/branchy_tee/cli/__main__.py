"""`python -m branchy_tee.cli`: the enclave launcher and tests run the command this way."""

from branchy_tee.cli import main

raise SystemExit(main())
