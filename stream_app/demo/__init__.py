"""The demo: sample checkout traffic (:mod:`.traffic`) and a live view of the
output topics (:mod:`.view`). ``tools/demo.py`` wires them to a real broker and
a worker; the ``stream-app traffic`` and ``stream-app watch`` subcommands
expose them on their own."""
