"""The compiler's user-facing error: one readable message naming the file, node and op."""


class CompileError(ValueError):
    """Input the compiler cannot handle; the message says what is wrong and what to do."""
