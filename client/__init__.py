"""edgeft.client: the device agent (``edgeft client``): ``agent`` (the protocol) and ``transport`` (TLS or
plaintext, the enrolment token, limits and keepalive). Never imports torch."""
