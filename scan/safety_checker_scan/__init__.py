"""`safety-checker scan`: check a tree of images with many requests in flight across one or more servers,
with a report, a summary, an HTML page for a moderator and a progress display; it uses the client's
`SafetyCheckerClient`, error type and record schema, and adds `scan` to the `safety-checker` command."""
