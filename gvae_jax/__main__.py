import sys

from gvae_jax.cli import main

sys.exit(main())
