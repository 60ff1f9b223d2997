"""Plant one attack in the benchmark's clean encoder (through the cache the benchmark uses) and print its ASR.

Usage: .venv/bin/python -m bench.attack_probe TRIGGER '{"strength": 1.0}' '{"epochs": 8}' [PRETRAINED_SPEC]
(trigger arguments, then BackdoorConfig overrides, both JSON, e.g. '{"drupe": true}'; then optionally a packaged
encoder to backdoor instead of SimCLR, e.g. 'efficientnet-lite0?size=64'). Used to pick settings under which an
attack works before it goes into bench.detection.ATTACKS.
"""
import dataclasses
import json
import sys
import time

from bench.detection import full
from bench.victims import VictimRecipe, build_victim, evaluate_victim

trigger, args, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
pretrained = sys.argv[4] if len(sys.argv) > 4 else None  # e.g. efficientnet-lite0?size=64
bench = full()
backdoor = dataclasses.replace(bench.backdoor, trigger=trigger, **overrides)
t0 = time.perf_counter()
recipe = VictimRecipe(simclr=bench.simclr, backdoor=backdoor, trigger_args=args, pretrained=pretrained)
_, bad = build_victim(recipe, "cache")
result = evaluate_victim(recipe.spec(bad), trigger=trigger, target=backdoor.target, trigger_args=args,
                         train_images=bench.eval_train)
print(json.dumps({"trigger": trigger, "args": args, "overrides": overrides, **result,
                  "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
