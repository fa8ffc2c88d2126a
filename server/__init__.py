"""edgeft.server: the federated coordinator (``edgeft server``).

``config`` (job files), ``store`` (state in SQL), ``artifacts`` (content-addressed files), ``coordinator``
(round rules), ``servicer`` (the gRPC face; ``create_server`` / ``serve``).
"""
