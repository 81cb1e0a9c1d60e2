import sys

from densegrpo_fast.cli import main

sys.exit(main())
