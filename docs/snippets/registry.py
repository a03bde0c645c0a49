# Discover, inspect and create selectors by name (entry-point group `fvlm.selectors`).
import fvlm

print(fvlm.list_selectors())  # every installed selector, built-in and plugin
print(fvlm.list_selectors("*prune*"))  # glob patterns
info = fvlm.selector_info("random")
print(info.cls, info.needs, info.parameters, info.distribution)
selector = fvlm.create_selector("random", keep=0.25, seed=3)
assert selector.keep == 0.25
