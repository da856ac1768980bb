"""The runner's manager: root, and only what needs root.

LXC (the sandbox image, the pool's containers), cgroups, /etc/subuid, AppArmor. It hands
containers to the front through `stockade.runner.channel` and destroys what a run left dirty.
"""
