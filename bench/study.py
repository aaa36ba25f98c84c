"""The method study: ``python bench/study.py [options]`` is ``thinet-fast study [options]``
(tables and plots under bench/results/; ``--help`` lists the options)."""
import sys

from thinet_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
