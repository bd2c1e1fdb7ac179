"""`python -m inception_flax.export --checkpoint DIR --out OUT ...`."""

import sys

from inception_flax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
