"""edgeft.server: the federated coordinator (``edgeft server``).

``config`` (job files), ``store`` (state in SQL), ``artifacts`` (content-addressed files), ``coordinator``
(round rules), ``auth`` (device enrolment tokens), ``certs`` (TLS files, ``edgeft certs``), ``servicer``
(the gRPC face; ``create_server`` / ``serve``).
"""
