"""The base of every error a user fixes by changing an input (a config key, a path, a data file,
a stale matrix): the message says what and how. The CLI prints these without a traceback."""


class UserError(Exception):
    pass
