"""edgeft.client: the device agent (``edgeft client``, ``python -m edgeft.client``). Lives in the repository's
top-level ``client/`` folder and installs as the package ``edgeft.client`` (pyproject.toml's ``package-dir``): ``agent`` (the protocol),
``device`` (its capabilities, training slots) and ``transport`` (TLS or plaintext, the enrolment token, limits
and keepalive). Never imports torch."""
