"""The error every pass raises for input it cannot handle: it names the node and the op."""


class PassError(ValueError):
    """A graph problem found by a pass; the message names the pass, node and op type."""

    def __init__(self, message: str, *, node: str | None = None, op_type: str | None = None, pass_name: str | None = None):
        where = []
        if pass_name:
            where.append(f"pass '{pass_name}'")
        if node is not None:
            where.append(f"node '{node}'" + (f" ({op_type})" if op_type else ""))
        super().__init__((", ".join(where) + ": " if where else "") + message)
        self.node = node
        self.op_type = op_type
        self.pass_name = pass_name
