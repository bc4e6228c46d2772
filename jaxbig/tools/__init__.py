"""The tools built on the training core: plan, bench, sweep (and their reports),
quantize, inference (eval and predict) and generate. The core never imports them."""
