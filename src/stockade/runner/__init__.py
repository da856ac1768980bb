"""The runner: the HTTP service in front of a pool of warm, unprivileged LXC sandbox containers."""
