"""Coverage-guided fuzzing of every protocol parser (issue 20): ``python -m bench fuzz [protocol ...]
[--inputs N | --seconds S] [-j 2]``; ``python -m bench fuzz --help`` for every option.

Not a benchmark of speed: it reports, per protocol, inputs run, inputs a second, escapes (an
exception other than ProtocolError out of a parser, or an internal_error counted by the
stage), slow inputs and the worst time a byte, and exits non-zero on any failure. The harness
is tests/fuzz/ (tests/fuzz/README.md). Run with the other benchmarks (``python -m bench``) it fuzzes
each protocol for 10 seconds.
"""

from __future__ import annotations

import sys

from tests.fuzz import campaign


def cli(argv: list[str]) -> int:
    return campaign.main(argv)


def main() -> None:
    campaign.main(["--seconds", "10", "-j", "2"])


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
