"""edgeft.client: the device agent (``edgeft client``, ``python -m edgeft.client``): ``agent`` (the protocol),
``device`` (its capabilities, training slots) and ``transport`` (TLS or plaintext, the enrolment token, limits
and keepalive). Never imports torch."""
