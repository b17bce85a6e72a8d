import sys

from intellect_jax.cli import main

sys.exit(main())
