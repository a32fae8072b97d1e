"""``python -m fl.runners.flower (supernode POLL_SECONDS | superexec) [Flower arguments]``: the tuned launchers."""

import sys

from fl.runners.flower import superexec_main, supernode_main

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "supernode":
        sys.exit(supernode_main(float(sys.argv[2]), sys.argv[3:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "superexec":
        sys.exit(superexec_main(sys.argv[2:]))
    sys.exit("usage: python -m fl.runners.flower (supernode POLL_SECONDS | superexec) [Flower arguments]")
