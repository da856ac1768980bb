"""The runner's front: the unprivileged HTTP side (user `stockade`, no capabilities).

It validates, admits and dispatches runs to the zygote sockets the manager leases to it,
and talks to the manager only through `stockade.runner.channel`. It never imports the
manager: nothing here can create, configure or destroy a container.
"""
