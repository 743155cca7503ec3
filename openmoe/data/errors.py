"""The one error of the data layer, in its own module so every data module can raise it without
importing another (sources.py reads tokens.py's folders; tokens.py raises DataError)."""


class DataError(ValueError):
    """A data source that cannot be used: names the source and the file or column."""
