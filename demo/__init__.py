"""`make demo` (`python -m demo`): the whole path offline, on a tiny random-weight checker.

It lives at the top level, beside `export` and `bench`, because it drives the
checkout's own pieces that no installed package carries (fixtures.checkers,
the export) and then the installed commands, as a user would run them.
"""
