"""Errors that end the agent with a one-line message instead of a traceback."""


class AgentError(Exception):
    """A problem the user can act on; the message is a single line saying what to do."""


class UnsupportedTarget(AgentError):
    """The target is not a Go program this agent can trace."""
