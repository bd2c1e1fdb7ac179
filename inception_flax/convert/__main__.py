import sys

from inception_flax.convert.cli import main

sys.exit(main())
