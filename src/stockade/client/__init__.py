"""What callers of a runner import: a client of its HTTP API (`remote`) and the interactive
session (`repl`). It imports no server code: only the API's shapes (`stockade.wire`), the
result record and the limits."""
