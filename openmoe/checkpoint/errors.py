"""The one error type of checkpoint reading and conversion.

Its message is a single line that names the parameter and the file at fault, so a CLI can
print it as it is instead of a traceback.
"""


class CheckpointError(ValueError):
    """Bad or unsupported checkpoint input; the message names the parameter and file."""
