"""Join a 2-peer group, then exit without closing (a crash, as the OS sees it)."""
import os
import sys

import lowband

group = lowband.init_group(int(sys.argv[1]), 2, store=sys.argv[2], peer_timeout=60)
print("JOINED", flush=True)
sys.stdin.readline()  # the test says when
os._exit(0)
