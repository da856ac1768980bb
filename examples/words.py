"""Count the words of the files named on the command line; write the counts to out/."""

import collections
import json
import os
import sys

counts = collections.Counter()
for name in sys.argv[1:]:
    with open(name) as handle:
        counts.update(handle.read().split())
os.makedirs("out", exist_ok=True)
with open("out/counts.json", "w") as out:
    json.dump(dict(counts.most_common(10)), out, indent=1)
print(f"{sum(counts.values())} words, {len(counts)} distinct")
