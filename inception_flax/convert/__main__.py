import sys

from inception_flax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
