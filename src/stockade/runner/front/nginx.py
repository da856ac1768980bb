"""The nginx site in front of a runner: slow clients cut off at 10 s, bodies capped at the
runner's own cap, connections per client limited. One template, used by the tests and by
the nginx role."""

from __future__ import annotations

import ipaddress
import math
import string

from stockade.runner.config import RunnerConfig
from stockade.runner.front.schema import REQUEST_ID

TEMPLATE = string.Template("""\
# stockade runner behind nginx. Rendered by `stockade nginx-config`; goes in the http
# context (e.g. /etc/nginx/conf.d/stockade.conf).
limit_conn_zone $$binary_remote_addr zone=stockade_per_client:10m;
limit_req_zone $$binary_remote_addr zone=stockade_rate:10m rate=${rate}r/s;
# The client's X-Request-Id when it is one the runner keeps, else nginx's own: the same id
# reaches the runner, comes back on every answer (nginx's own errors too) and is logged.
map $$http_x_request_id $$stockade_request_id {
    "~^${request_id}$$" $$http_x_request_id;
    default $$request_id;
}
log_format stockade '$$remote_addr [$$time_local] "$$request" $$status $$body_bytes_sent '
                    '$$request_time id=$$stockade_request_id';
${real_ip}
upstream stockade_runner {
    server ${upstream};
    keepalive 32;
}

server {
    listen ${listen};
    server_name _;
    server_tokens off;

    # A client that dribbles its headers or body, or does not read the answer, is cut off.
    client_header_timeout 10s;
    client_body_timeout 10s;
    send_timeout 10s;
    keepalive_timeout 15s;
    # The runner's own body cap, so an oversized body never reaches it. A body past the
    # small buffer waits on disk, so slow clients cannot pin memory with large bodies.
    client_max_body_size ${body_kib}k;
    client_body_buffer_size 16k;
    large_client_header_buffers 4 8k;

    limit_conn stockade_per_client ${connections};
    limit_conn_status 503;
    limit_req zone=stockade_rate burst=${burst} nodelay;
    limit_req_status 503;

    # The pages' own files travel compressed (the API docs' library is ~1.7 MB); the API's
    # answers do not (they echo what a caller sent: no compression oracle).
    gzip on;
    gzip_types text/css text/javascript;
    gzip_min_length 1024;
    gzip_proxied any;

    access_log ${access_log} stockade;
    add_header X-Request-Id $$stockade_request_id always;

    location / {
        proxy_pass http://stockade_runner;
${proxied}        proxy_connect_timeout 2s;
        # Longest run allowed, plus the time a request may wait for a container.
        proxy_read_timeout ${read_timeout}s;
        proxy_send_timeout 10s;
        proxy_request_buffering on;
    }
${mcp}}
""")

# How both locations pass a request on: the request id, keep-alive upstream, the caller's
# Host and address.
PROXIED = """\
        proxy_set_header X-Request-Id $stockade_request_id;
        proxy_hide_header X-Request-Id;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
"""

# MCP over HTTP: streams answered as they come, held open longer than an idle MCP session
# lives (its server pings every 15 s); the caller's Host, key and request id go through.
MCP_LOCATION = string.Template("""
    location = /mcp {
        proxy_pass http://127.0.0.1:${port};
${proxied}        proxy_buffering off;
        proxy_cache off;
        proxy_connect_timeout 2s;
        proxy_read_timeout ${read_timeout}s;
        proxy_send_timeout 10s;
    }
""")


def real_ip(trusted_proxies: list[str]) -> str:
    """Behind a balancer every client has the balancer's address, and one per-client limit
    for all: the address a trusted balancer puts in X-Forwarded-For is the client's.
    Only the listed balancers are believed (a client's own header is not)."""
    if not trusted_proxies:
        return ""
    lines = ["# Clients' addresses as the trusted balancers report them (X-Forwarded-For)."]
    for proxy in trusted_proxies:
        ipaddress.ip_network(proxy, strict=False)  # a ValueError names a bad one
        lines.append(f"set_real_ip_from {proxy};")
    return "\n".join([*lines, "real_ip_header X-Forwarded-For;", "real_ip_recursive on;", ""])


def render(config: RunnerConfig, listen: str = "80", upstream: str | None = None, *,
           connections: int = 64, rate: int = 200, burst: int = 400,
           access_log: str = "/var/log/nginx/access.log",
           trusted_proxies: list[str] | None = None) -> str:
    read_timeout = math.ceil(config.limits.maximum.wall_time_s + config.queue_timeout_s + 10)
    return TEMPLATE.substitute(
        listen=listen, upstream=upstream or f"{config.host}:{config.port}",
        body_kib=config.max_body_kib, connections=connections, rate=rate, burst=burst,
        read_timeout=read_timeout, request_id=REQUEST_ID.pattern, access_log=access_log,
        real_ip=real_ip(trusted_proxies or []), proxied=PROXIED, mcp=MCP_LOCATION.substitute(
            port=config.mcp_port, proxied=PROXIED,
            read_timeout=math.ceil(config.mcp_idle_timeout_s + 60)) if config.mcp_port else "")
