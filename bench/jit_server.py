"""Cold-start baseline (c): a server that jits and warms up the artifact's buckets at startup, then
answers one prompt. Prints one JSON line when the first token is ready."""

import json
import sys
import time

from bench.common import ARTIFACT, JitExecutor

if __name__ == "__main__":
    from runtime.scheduler import generate

    executor = JitExecutor(ARTIFACT, warm=True)
    outputs, _ = generate(executor, [[int(t) for t in sys.argv[1].split(",")]], 1)
    print(json.dumps({"outputs": outputs, "ready": time.time()}))
