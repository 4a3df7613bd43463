"""The `gateway` command: one module per verb group; `main` parses and dispatches.

`control` decides how a verb reaches the gateway: the admin API of a running server, or the
same API in-process on a stopped server's files; `display` draws tables and progress through rich
(plain text when piped).
"""
