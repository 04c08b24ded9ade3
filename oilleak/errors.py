"""The one exception type the CLI turns into a clear message (exit code 2) instead of a traceback."""


class OilleakError(Exception):
    """Bad input or an unusable setup. The message names the file, the field and the fix."""
