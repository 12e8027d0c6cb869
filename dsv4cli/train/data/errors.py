"""The one error type of the data layer."""


class DataError(ValueError):
    """Bad data input (missing files, a tokenizer that does not fit the model): exit 2."""
