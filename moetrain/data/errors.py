"""DataError, which every data module raises (its own module, so the package imports its submodules plainly)."""


class DataError(ValueError):
    """Bad data input or settings; the message names the culprit and the fix in one line."""
