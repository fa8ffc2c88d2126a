"""edgeft.server: the federated coordinator (``edgeft server``).

Lives in the repository's top-level ``server/`` folder and installs as the package ``edgeft.server`` (pyproject.toml's
``package-dir``); docs/development.md has the layout. One module per responsibility: ``config`` / ``job_config``
(jobs.toml), ``store`` (the tables), ``state`` (the named SQL queries), ``artifacts`` (content-addressed files),
``jobs`` (each job's bundles), ``rounds`` / ``secure`` (the round rules), ``evaluation``, ``history``,
``coordinator`` (the facade over them), ``auth`` (enrolment tokens), ``certs`` (TLS files, ``edgeft certs``),
``servicer`` (the gRPC face; ``create_server`` / ``serve``), ``loop`` (the gRPC server on one event loop).
"""
